"""POST /v1/completions: a prompt string, a list of them, or token ids."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.generation import (
    GENERATION_RESPONSES,
    Choice,
    StreamFormat,
    Usage,
    collect,
    compile_grammar,
    engine,
    new_id,
    prompt_token_count,
    resolve_adapter,
    stream,
    submit_choices,
    token_text,
    tokenize,
    usage,
)
from server.api.logprobs import TokenText, completion_logprobs
from server.api.schemas import CompletionRequest
from server.api.structured import guided_spec
from server.engine.engine import Engine
from server.engine.request import Delta

router = APIRouter(tags=["generation"])


def completion_stream(text: TokenText, body: CompletionRequest, echoes: list[str]) -> StreamFormat:
    """Chunks of one completions stream; `echoes` is each prompt's text, sent first if `echo` is set."""
    scored = body.logprobs is not None

    def delta(choice: Choice, event: Delta) -> dict[str, Any]:
        logprobs = None
        if scored:
            logprobs, choice.text_offset = completion_logprobs(
                text, [(e.token_id, e) for e in event.logprobs], choice.text_offset
            )
        return {"index": choice.index, "text": event.text, "logprobs": logprobs, "finish_reason": None}

    def prompt(choice: Choice) -> dict[str, Any]:
        logprobs = None
        if scored:
            logprobs, choice.text_offset = completion_logprobs(text, _prompt_entries(choice))
        echo = echoes[choice.index // body.n]
        return {"index": choice.index, "text": echo, "logprobs": logprobs, "finish_reason": None}

    return StreamFormat(
        object="text_completion",
        start=lambda choice: None,
        delta=delta,
        end=lambda c, reason: {"index": c.index, "text": "", "logprobs": None, "finish_reason": reason},
        prompt=prompt,
    )


def _prompt_entries(choice: Choice) -> list:
    return list(zip(choice.prompt_ids, choice.prompt_logprobs or (), strict=True))


def _choice(text: TokenText, body: CompletionRequest, choice: Choice, echo: str) -> dict[str, Any]:
    logprobs = None
    if body.logprobs is not None:
        entries = _prompt_entries(choice) if body.echo else []
        logprobs, _ = completion_logprobs(text, entries + [(e.token_id, e) for e in choice.logprobs])
    return {
        "index": choice.index,
        "text": (echo if body.echo else "") + "".join(choice.text),
        "logprobs": logprobs,
        "finish_reason": choice.finished.reason,
    }


async def _encode(eng: Engine, text: str) -> list[int]:
    """Token ids of a text prompt. Text the tokenizer drops entirely (control characters, say)
    starts from the beginning-of-text token: the request is valid, there is just nothing to read."""
    ids = await tokenize(lambda: eng.encode_text(text))
    if ids:
        return ids
    start = (
        eng.tokenizer.bos_token_id if eng.tokenizer.bos_token_id is not None else eng.tokenizer.eos_token_id
    )
    return [start] if start is not None else []


@router.post("/v1/completions", response_model=None, responses=GENERATION_RESPONSES)
async def completions(body: CompletionRequest, request: Request) -> dict[str, Any] | StreamingResponse:
    eng = engine(request)
    adapter = resolve_adapter(request, body.model)
    grammar = guided_spec(body)
    await compile_grammar(request, grammar)
    prompts = [p if isinstance(p, list) else await _encode(eng, p) for p in body.prompts()]
    echoes = [""] * len(prompts)
    if body.echo:
        echoes = [
            p if isinstance(p, str) else await tokenize(lambda ids=ids: eng.tokenizer.decode(ids))
            for p, ids in zip(body.prompts(), prompts, strict=True)
        ]
    choices = submit_choices(request, body, prompts, adapter, "prompt", grammar)
    response_id = new_id("cmpl")
    text = token_text(request)
    if body.stream:
        fmt = completion_stream(text, body, echoes)
        report = Usage(body.include_usage(), body.continuous_usage())
        events = stream(choices, fmt, response_id, body.model, report, body.n)
        return StreamingResponse(events, media_type="text/event-stream")
    await collect(request, choices)
    return {
        "id": response_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [_choice(text, body, c, echoes[c.index // body.n]) for c in choices],
        "usage": usage(choices, prompt_token_count(choices, body.n)),
    }
