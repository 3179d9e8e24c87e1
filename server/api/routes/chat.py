"""POST /v1/chat/completions."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.errors import APIError
from server.api.generation import (
    GENERATION_RESPONSES,
    Choice,
    StreamFormat,
    Usage,
    collect,
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
from server.api.logprobs import TokenText, chat_logprobs
from server.api.schemas import ChatCompletionRequest
from server.engine.request import Delta

router = APIRouter(tags=["generation"])


def chat_stream(text: TokenText, scored: bool) -> StreamFormat:
    """Chunks of one chat stream; with `scored`, each carries its tokens' logprobs."""

    def delta(choice: Choice, event: Delta) -> dict[str, Any]:
        logprobs = chat_logprobs(text, event.logprobs) if scored else None
        return {
            "index": choice.index,
            "delta": {"content": event.text},
            "logprobs": logprobs,
            "finish_reason": None,
        }

    return StreamFormat(
        object="chat.completion.chunk",
        start=lambda c: {
            "index": c.index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        },
        delta=delta,
        end=lambda c, reason: {"index": c.index, "delta": {}, "logprobs": None, "finish_reason": reason},
    )


@router.post("/v1/chat/completions", response_model=None, responses=GENERATION_RESPONSES)
async def chat_completions(
    body: ChatCompletionRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    eng = engine(request)
    adapter = resolve_adapter(request, body.model)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        prompt_ids = await tokenize(lambda: eng.encode_chat(messages))
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from exc
    choices = submit_choices(request, body, [prompt_ids], adapter, "messages")
    response_id = new_id("chatcmpl")
    text = token_text(request)
    if body.stream:
        report = Usage(body.include_usage(), body.continuous_usage())
        events = stream(choices, chat_stream(text, body.logprobs), response_id, body.model, report, body.n)
        return StreamingResponse(events, media_type="text/event-stream")
    await collect(request, choices)
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": "".join(c.text), "refusal": None},
                "logprobs": chat_logprobs(text, c.logprobs) if body.logprobs else None,
                "finish_reason": c.finished.reason,
            }
            for c in choices
        ],
        "usage": usage(choices, prompt_token_count(choices, body.n)),
    }
