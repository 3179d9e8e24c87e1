"""Merge for zero latency: fold an adapter into the base, for every method that folds (`Method.fold`).

The merged weights start from what the server computes with: the served linear layers'
weights, dequantized when the base runs in 4 or 8 bits. The export is a plain HF model folder
(safetensors, config, generation config, tokenizer) that `from_pretrained` loads, saved in
16-bit when the base was quantized. Each method says whether and how it folds (`Method.fold`,
`merge_refusal`); folding runs on the base's device.

Over HTTP an export is a background job (MergeJobs): it loads a float32 copy of the base,
which takes seconds to minutes, so it runs on a worker thread of its own, one at a time,
and no request waits for it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from server.adapters.common import AdapterError, AdapterRef, AdapterWeights
from server.adapters.methods import method_by_type, method_of
from server.base_model import LoadedModel, dense_weight, linear_module
from server.registry.store import Store, sha256_file
from server.torch_threads import SerialWorker

log = logging.getLogger("peftserve.registry")

KEEP_JOBS = 256
_BIAS_FLAGS = {
    "attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp_bias": ("gate_proj", "up_proj", "down_proj"),
}
"""Llama-style configs switch linear biases on per block; a merged bias needs its block's flag."""


class MergeError(AdapterError):
    """This adapter (or base) cannot be merged; the message says why."""


def check_mergeable(weights: AdapterWeights) -> None:
    check_kind(weights.peft_type)


def check_kind(peft_type: str) -> None:
    refusal = method_by_type(peft_type).merge_refusal
    if refusal is not None:
        raise MergeError(f"{peft_type} adapters cannot be merged: {refusal}", "peft_type")


def _linears(model: LoadedModel):
    for layer in range(model.shape.num_layers):
        for name in model.shape.linear_dims():
            yield (layer, name), linear_module(model.hf, layer, name)


def export_merged(model: LoadedModel, weights: AdapterWeights, out: Path) -> Path:
    """Write the merged model to `out` (a new folder, published atomically)."""
    check_mergeable(weights)
    method = method_of(weights)
    folded = {}
    for site, served in _linears(model):
        bias = None if served.bias is None else served.bias.detach().float()
        folded[site] = method.fold(weights, site, dense_weight(served), bias)
    params = method.fold_params(weights, lambda name: model.hf.get_parameter(name).detach().float())
    config = AutoConfig.from_pretrained(model.hf.name_or_path)
    added = {site[1] for site, (_, bias) in folded.items() if bias is not None}
    for flag, modules in _BIAS_FLAGS.items():  # a bias the base lacks: the merged model gets them all
        if added & set(modules) and not getattr(config, flag, False):
            setattr(config, flag, True)
    untie = config.tie_word_embeddings and bool({"model.embed_tokens.weight", "lm_head.weight"} & set(params))
    if untie:  # the adapter changes one of the two matrices the base shares
        config.tie_word_embeddings = False
    merged = AutoModelForCausalLM.from_pretrained(model.hf.name_or_path, config=config, dtype=torch.float32)
    if untie:
        merged.lm_head.weight = torch.nn.Parameter(merged.model.embed_tokens.weight.detach().clone())
    for (layer, name), (weight, bias) in folded.items():
        target = linear_module(merged, layer, name)
        target.weight.data = weight.cpu()
        if target.bias is not None:
            target.bias.data = torch.zeros(weight.shape[0]) if bias is None else bias.cpu()
    for name, value in params.items():
        merged.get_parameter(name).data = value.cpu()
    dtype = torch.bfloat16 if model.quantize != "none" and model.dtype == torch.float32 else model.dtype
    merged.to(dtype)
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    model.tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def fold_into(model: LoadedModel, weights: AdapterWeights) -> None:
    """Fold the adapter into the served weights in place (for `serve --merge-adapter`)."""
    check_mergeable(weights)
    method = method_of(weights)
    if model.quantize != "none":
        raise MergeError(
            "--merge-adapter needs an unquantized base: merge offline with `peftserve merge` and serve the "
            "result with --quantize",
            "quantize",
        )
    with torch.no_grad():
        for site, served in _linears(model):
            bias = None if served.bias is None else served.bias.float()
            weight, bias = method.fold(weights, site, served.weight.float(), bias)
            served.weight.copy_(weight.to(served.weight.dtype))
            if bias is not None and served.bias is None:  # an added bias: the linear gets one
                served.bias = torch.nn.Parameter(bias.to(served.weight.dtype), requires_grad=False)
            elif bias is not None:
                served.bias.copy_(bias.to(served.bias.dtype))
        params = method.fold_params(weights, lambda name: model.hf.get_parameter(name).detach().float())
        hf = model.hf
        if {"model.embed_tokens.weight", "lm_head.weight"} & set(params) and (
            hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
        ):
            hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone(), requires_grad=False)
        for name, value in params.items():
            target = hf.get_parameter(name)
            target.copy_(value.to(target.dtype))


def export_archive(
    model: LoadedModel, weights: AdapterWeights, folder: Path, archive: Path, top: str
) -> Path:
    """Export the merged model into `folder` and pack it as `archive` (.tar.gz, one folder `top`)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    export_merged(model, weights, folder)
    tmp = archive.with_name(f".{archive.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(folder, arcname=top)
    tmp.replace(archive)
    return archive


def merged_paths(root: Path, ref: AdapterRef) -> tuple[Path, Path]:
    """Where the merged export of `ref` lives in the store: its folder and its .tar.gz."""
    folder = root / ".merged" / ref.key.replace("#", "-")
    return folder, folder.with_name(folder.name + ".tar.gz")


def archive_builder(store: Store, model: LoadedModel) -> Callable[[AdapterRef], Path]:
    """What a merge job runs: verify and parse the adapter, fold it into a float32 base, pack it."""

    def build(ref: AdapterRef) -> Path:
        if store.validate is None:
            raise MergeError("this store has no loader; it cannot merge")
        weights = store.validate(store.verified_path(ref))
        folder, archive = merged_paths(store.root, ref)
        return export_archive(model, weights, folder, archive, f"{ref.name}-v{ref.version}-merged")

    return build


JobStatus = Literal["queued", "running", "succeeded", "failed"]


@dataclass
class MergeJob:
    """One merge export; what GET /v1/merges/{id} answers."""

    id: str
    name: str
    version: int
    peft_type: str
    created: int
    status: JobStatus = "queued"
    error: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    finished: int | None = None

    @property
    def model(self) -> str:
        return f"{self.name}@{self.version}"

    def public(self) -> dict[str, Any]:
        return {
            "object": "merge_job",
            **asdict(self),
            "status_url": f"/v1/merges/{self.id}",
            "download": f"/v1/adapters/{self.model}/merged",
        }


class MergeJobs:
    """Merge exports run one at a time on a thread that exits when none is left (server/torch_threads.py);
    the latest KEEP_JOBS are remembered."""

    def __init__(self, build: Callable[[AdapterRef], Path]) -> None:
        self._build = build
        self._jobs: OrderedDict[str, MergeJob] = OrderedDict()
        self._refs: dict[str, AdapterRef] = {}
        self._lock = threading.Lock()
        self._worker = SerialWorker("peftserve-merge")

    def submit(self, ref: AdapterRef) -> MergeJob:
        """Queue an export of `ref` (refused at once if its kind cannot merge); a pending one is reused."""
        check_kind(ref.peft_type)
        with self._lock:
            for job in self._jobs.values():
                if job.model == f"{ref.name}@{ref.version}" and job.status in ("queued", "running"):
                    return job
            job = MergeJob(
                f"merge-{uuid.uuid4().hex[:24]}", ref.name, ref.version, ref.peft_type, int(time.time())
            )
            self._jobs[job.id] = job
            self._refs[job.id] = ref
            while len(self._jobs) > KEEP_JOBS:
                old, _ = self._jobs.popitem(last=False)
                self._refs.pop(old, None)
        self._worker.submit(self._run, job.id)
        return job

    def get(self, job_id: str) -> MergeJob:
        """The job; KeyError if there is none (or it is too old to be remembered)."""
        with self._lock:
            return self._jobs[job_id]

    def stop(self) -> None:
        """Run no more jobs (the one running finishes)."""
        self._worker.shutdown()

    def _run(self, job_id: str) -> None:
        with self._lock:
            job, ref = self._jobs.get(job_id), self._refs.get(job_id)
        if job is None or ref is None:
            return
        job.status = "running"
        try:
            archive = self._build(ref)
            job.sha256 = sha256_file(archive)
            job.size_bytes = archive.stat().st_size
            job.status = "succeeded"
        except AdapterError as exc:
            job.error, job.status = str(exc), "failed"
        except Exception as exc:  # a job must end, and say why, whatever went wrong
            log.exception("merge job %s (%s) failed", job.id, job.model)
            job.error, job.status = (
                f"the merge failed: {type(exc).__name__}; see the server log",
                "failed",
            )
        job.finished = int(time.time())
        log.info("merge job %s (%s): %s", job.id, job.model, job.status)
