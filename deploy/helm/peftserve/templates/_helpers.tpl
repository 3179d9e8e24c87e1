{{- define "peftserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "peftserve.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "peftserve.labels" -}}
{{ include "peftserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* One `peftserve serve` argument: whole numbers without YAML's float exponent (1073741824, not 1.073741824e+09). */}}
{{- define "peftserve.arg" -}}
{{- $value := .value -}}
{{- if and (kindIs "float64" $value) (eq $value (float64 (int64 $value))) -}}
{{- $value = int64 $value -}}
{{- end -}}
{{- printf "--%s=%v" .flag $value | quote -}}
{{- end -}}

{{- define "peftserve.storeClaim" -}}
{{- .Values.store.persistence.existingClaim | default (printf "%s-store" (include "peftserve.fullname" .)) -}}
{{- end -}}
