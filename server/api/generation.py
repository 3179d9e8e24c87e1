"""What the chat and completions endpoints share: submit choices, collect or stream them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from server.adapters.common import AdapterRef
from server.api.errors import APIError, documented
from server.api.logprobs import TokenText
from server.api.schemas import ChatCompletionRequest, CompletionRequest
from server.engine.engine import Engine
from server.engine.grammar import GrammarSpec
from server.engine.request import (
    ContextLengthError,
    Delta,
    EngineError,
    EngineStopped,
    Event,
    Finished,
    InvalidRequest,
    PromptLogprobs,
    QueueFull,
    RequestHandle,
    TokenLogprob,
    UnknownModel,
)
from server.engine.sampler import SamplingParams

SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE] at the end"}},
}
GENERATION_RESPONSES = {
    200: {
        "description": "The completion as JSON, or with `stream: true` server-sent events (`data: {chunk}`, "
        "ending with `data: [DONE]`)",
        "content": {"text/event-stream": {"itemSchema": SSE_EVENT}},
    },
    **documented(400, 401, 403, 404, 413, 429, 503),
}
RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL_SECONDS = 0.1
CLIENT_CLOSED = 499  # as nginx logs it: the client went away before the answer


def engine(request: Request) -> Engine:
    return request.app.state.engine


def token_text(request: Request) -> TokenText:
    """Token texts and bytes for the logprobs shapes, one cache per app."""
    state = request.app.state
    if getattr(state, "token_text", None) is None:
        state.token_text = TokenText(engine(request).tokenizer)
    return state.token_text


def resolve_adapter(request: Request, model: str) -> AdapterRef | None:
    """The adapter the `model` field names (None: the base); counts the request per model name."""
    counter = request.app.state.metrics.adapter_requests
    eng = engine(request)
    try:
        ref = eng.resolve_model(model)
    except UnknownModel as exc:
        counter.labels(adapter="other").inc()
        request.app.state.metrics.request_failure.labels(reason="invalid_request").inc()
        raise APIError(404, str(exc), param="model", code="model_not_found") from exc
    counter.labels(adapter=ref.name if ref else eng.model.name).inc()
    return ref


def as_api_error(exc: Exception, prompt_param: str) -> APIError:
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, UnknownModel):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, EngineStopped):
        return APIError(503, str(exc), headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), param=prompt_param)
    raise exc


@dataclass
class Choice:
    """One generated choice: the handle while running, then its result."""

    index: int
    handle: RequestHandle
    prompt_ids: list[int]
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    generated: int = 0
    """Tokens generated so far (for usage while streaming; `finished` has the final count)."""
    text_offset: int = 0
    """Characters of text streamed so far (the legacy logprobs' `text_offset` goes on from it)."""
    finished: Finished | None = None


def submit_choices(
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    prompts: list[list[int]],
    adapter: AdapterRef | None,
    prompt_param: str,
    grammar: GrammarSpec | None = None,
) -> list[Choice]:
    """Submit n choices per prompt; on any refusal cancel those already queued and raise an APIError."""
    eng = engine(request)
    choices: list[Choice] = []
    try:
        for prompt_ids in prompts:
            limit = body.completion_limit()
            virtual = adapter.virtual_tokens if adapter else 0
            max_tokens = limit if limit is not None else max(1, eng.max_model_len - virtual - len(prompt_ids))
            for i in range(body.n):
                params = SamplingParams(
                    max_tokens=max_tokens,
                    temperature=body.temperature,
                    top_p=body.top_p,
                    top_k=max(body.top_k, 0),
                    # n > 1 with a seed: distinct choices that are still reproducible.
                    seed=None if body.seed is None else body.seed + i,
                    stop=body.stop_strings(),
                    ignore_eos=body.ignore_eos,
                    logprobs=body.logprobs_wanted(),
                    prompt_logprobs=body.prompt_logprobs_wanted(),
                    logit_bias=body.bias(),
                    grammar=grammar,
                )
                handle = eng.submit(prompt_ids, params, adapter)
                choices.append(Choice(len(choices), handle, prompt_ids))
    except (EngineError, ValueError) as exc:
        for choice in choices:
            choice.handle.cancel()
        error = as_api_error(exc, prompt_param)
        reason = "queue_full" if isinstance(exc, QueueFull) else "invalid_request"
        request.app.state.metrics.request_failure.labels(reason=reason).inc()
        raise error from exc
    return choices


async def compile_grammar(request: Request, spec: GrammarSpec | None) -> None:
    """Compile a request's grammar in a worker thread (neither the event loop nor the engine thread
    waits on a slow schema); later submits find it in the cache. 400 if it is not a grammar."""
    if spec is None:
        return
    try:
        await run_in_threadpool(engine(request).grammars.compile, spec)
    except InvalidRequest as exc:
        request.app.state.metrics.request_failure.labels(reason="invalid_request").inc()
        raise APIError(400, str(exc), param=exc.param) from exc


async def tokenize(fn: Callable[[], list[int]]) -> list[int]:
    """Tokenize off the event loop: a long prompt must not stall other requests."""
    return await run_in_threadpool(fn)


async def _events(choices: list[Choice]) -> AsyncIterator[tuple[Choice, Event]]:
    """Events of all choices as they come."""
    if len(choices) == 1:
        async for event in choices[0].handle:
            yield choices[0], event
        return
    merged: asyncio.Queue[tuple[Choice, Event]] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        async for event in choice.handle:
            await merged.put((choice, event))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        remaining = len(choices)
        while remaining:
            choice, event = await merged.get()
            remaining -= isinstance(event, Finished)
            yield choice, event
    finally:
        for task in tasks:
            task.cancel()


def _record(choice: Choice, event: Event) -> None:
    if isinstance(event, Delta):
        choice.text.append(event.text)
        choice.logprobs += event.logprobs
        choice.generated += len(event.token_ids)
    elif isinstance(event, PromptLogprobs):
        choice.prompt_logprobs = event.logprobs
    else:
        choice.finished = event


def _failure(finished: Finished) -> APIError | None:
    """The error a choice ended with, if it did not end normally."""
    if finished.reason == "error":
        return APIError(500, finished.error or "generation failed")
    if finished.reason == "abort":
        retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return APIError(503, finished.error or "the request was cancelled", headers=retry)
    return None


def _check_failed(choices: list[Choice]) -> None:
    for choice in choices:
        error = _failure(choice.finished) if choice.finished is not None else None
        if error is not None:
            raise error


async def collect(request: Request, choices: list[Choice]) -> list[Choice]:
    """Wait for every choice; if the client goes away first, cancel them all."""

    async def run() -> None:
        async for choice, event in _events(choices):
            _record(choice, event)

    task = asyncio.create_task(run())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                # Nobody reads this answer; it ends the request without a traceback in the log.
                raise APIError(CLIENT_CLOSED, "the client closed the connection")
        await task
    finally:
        for choice in choices:
            if choice.finished is None:
                choice.handle.cancel()
    _check_failed(choices)
    return choices


def usage(choices: list[Choice], prompt_tokens: int) -> dict[str, int]:
    """Token counts; while streaming, those of the tokens generated so far."""
    completion = sum(c.finished.completion_tokens if c.finished else c.generated for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def prompt_token_count(choices: list[Choice], n: int) -> int:
    """Prompt tokens counted once per prompt, not once per choice, as OpenAI does."""
    return sum(c.finished.prompt_tokens for c in choices[::n] if c.finished)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


@dataclass
class StreamFormat:
    """How one endpoint shapes its stream chunks."""

    object: str
    start: Callable[[Choice], Payloads]
    delta: Callable[[Choice, Delta], Payloads]
    end: Callable[[Choice, str], Payloads]
    prompt: Callable[[Choice], Payloads] = lambda choice: None
    """The chunk for a choice's scored prompt (an echo), when it arrives."""


Payloads = dict[str, Any] | list[dict[str, Any]] | None
"""One choice payload, several (each its own chunk, in order), or none."""


def _payloads(payloads: Payloads) -> list[dict[str, Any]]:
    if payloads is None:
        return []
    return payloads if isinstance(payloads, list) else [payloads]


@dataclass(frozen=True)
class Usage:
    """What a stream reports of usage: at the end (include_usage), or on every chunk as well
    (vLLM's continuous_usage_stats)."""

    at_end: bool = False
    every_chunk: bool = False


async def stream(
    choices: list[Choice], fmt: StreamFormat, response_id: str, model: str, report: Usage, n: int
) -> AsyncIterator[str]:
    """SSE chunks for all choices; cancels every choice if the client goes away."""
    created = int(time.time())
    prompt_tokens = sum(len(c.prompt_ids) for c in choices[::n])

    def chunk(choice_payloads: list[dict[str, Any]], final: bool = False):
        body: dict[str, Any] = {
            "id": response_id,
            "object": fmt.object,
            "created": created,
            "model": model,
            "choices": choice_payloads,
        }
        if report.at_end:
            body["usage"] = usage(choices, prompt_tokens) if final or report.every_chunk else None
        return sse(body)

    try:
        for choice in choices:
            for payload in _payloads(fmt.start(choice)):
                yield chunk([payload])
        async for choice, event in _events(choices):
            _record(choice, event)
            if isinstance(event, Delta):
                if event.text or event.logprobs:
                    for payload in _payloads(fmt.delta(choice, event)):
                        yield chunk([payload])
            elif isinstance(event, PromptLogprobs):
                for payload in _payloads(fmt.prompt(choice)):
                    yield chunk([payload])
            elif (error := _failure(event)) is not None:
                yield sse(error.body())
                yield sse("[DONE]")
                return
            else:
                for payload in _payloads(fmt.end(choice, event.reason)):
                    yield chunk([payload])
        if report.at_end:
            yield chunk([], final=True)
        yield sse("[DONE]")
    finally:
        for choice in choices:
            if choice.finished is None:
                choice.handle.cancel()
