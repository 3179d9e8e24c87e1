"""POST /v1/completions: a prompt string, a list of them, or token ids."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.generation import (
    GENERATION_RESPONSES,
    StreamFormat,
    collect,
    compile_grammar,
    engine,
    new_id,
    prompt_token_count,
    resolve_adapter,
    stream,
    submit_choices,
    tokenize,
    usage,
)
from server.api.schemas import CompletionRequest
from server.api.structured import guided_spec
from server.engine.engine import Engine

router = APIRouter(tags=["generation"])

COMPLETION_STREAM = StreamFormat(
    object="text_completion",
    start=lambda i: None,
    delta=lambda i, text: {"index": i, "text": text, "logprobs": None, "finish_reason": None},
    end=lambda i, reason: {"index": i, "text": "", "logprobs": None, "finish_reason": reason},
)


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
    choices = submit_choices(request, body, prompts, adapter, "prompt", grammar)
    response_id = new_id("cmpl")
    if body.stream:
        events = stream(choices, COMPLETION_STREAM, response_id, body.model, body.include_usage(), body.n)
        return StreamingResponse(events, media_type="text/event-stream")
    await collect(request, choices)
    return {
        "id": response_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [
            {"index": c.index, "text": "".join(c.text), "logprobs": None, "finish_reason": c.finished.reason}
            for c in choices
        ],
        "usage": usage(choices, prompt_token_count(choices, body.n)),
    }
