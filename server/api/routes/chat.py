"""POST /v1/chat/completions."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.errors import APIError
from server.api.generation import (
    GENERATION_RESPONSES,
    StreamFormat,
    collect,
    engine,
    new_id,
    prompt_token_count,
    resolve_adapter,
    stream,
    submit_choices,
    tokenize,
    usage,
)
from server.api.schemas import ChatCompletionRequest

router = APIRouter(tags=["generation"])

CHAT_STREAM = StreamFormat(
    object="chat.completion.chunk",
    start=lambda i: {
        "index": i,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    },
    delta=lambda i, text: {"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None},
    end=lambda i, reason: {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason},
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
    if body.stream:
        events = stream(choices, CHAT_STREAM, response_id, body.model, body.include_usage(), body.n)
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
                "logprobs": None,
                "finish_reason": c.finished.reason,
            }
            for c in choices
        ],
        "usage": usage(choices, prompt_token_count(choices, body.n)),
    }
