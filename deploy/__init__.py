"""Deployment: Docker Compose with Prometheus and Grafana, the Helm chart, Ray Serve replicas."""
