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
from server.api.logprobs import TokenText, chat_logprobs
from server.api.schemas import ChatCompletionRequest, NamedToolChoice
from server.api.structured import guided_spec, tool_call_spec
from server.api.tools import ToolMode, ToolOutput, template_message, tool_mode
from server.engine.grammar import GrammarSpec
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


NO_TOOL_TEMPLATE = (
    "this model's chat template does not render tools; serve it with a template that does, "
    "e.g. --chat-template templates/hermes_tools.jinja"
)


def _grammar(body: ChatCompletionRequest, mode: ToolMode) -> GrammarSpec | None:
    """A forced call's grammar, or the one response_format / guided_* asks for (with `auto`, its
    output is then parsed for calls as any other)."""
    guided = guided_spec(body)
    if mode in ("text", "auto"):
        return guided
    if guided is not None:
        message = f"{guided.param}: cannot be combined with a `required` or named tool_choice"
        raise APIError(400, message, param=guided.param)
    return tool_call_spec(body.tools or [], body.tool_choice, body.parallel_tool_calls)  # type: ignore[arg-type]


def _tool_stream(outputs: list[ToolOutput]) -> StreamFormat:
    """Chunks of choices in a tool mode: each choice's ToolOutput says what its deltas are."""

    def payload(i: int, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}

    def end(c: Choice, reason: str) -> list[dict[str, Any]]:
        deltas, finish = outputs[c.index].end(reason)
        return [payload(c.index, d) for d in deltas] + [payload(c.index, {}, finish)]

    return StreamFormat(
        object="chat.completion.chunk",
        start=lambda c: payload(c.index, outputs[c.index].start()),
        delta=lambda c, event: [payload(c.index, d) for d in outputs[c.index].feed(event.text)],
        end=end,
    )


def _message(choice: Choice, output: ToolOutput | None) -> tuple[dict[str, Any], str]:
    text, reason = "".join(choice.text), choice.finished.reason
    if output is None:
        return {"role": "assistant", "content": text, "refusal": None}, reason
    return output.message(text, reason)


@router.post("/v1/chat/completions", response_model=None, responses=GENERATION_RESPONSES)
async def chat_completions(
    body: ChatCompletionRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    eng = engine(request)
    adapter = resolve_adapter(request, body.model)
    mode = tool_mode(body)
    if mode != "text" and not eng.template_renders_tools:
        raise APIError(400, f"tools: {NO_TOOL_TEMPLATE}", param="tools")
    grammar = _grammar(body, mode)
    await compile_grammar(request, grammar)
    messages = [template_message(m) for m in body.messages]
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if mode != "text" and body.tools else None
    try:
        prompt_ids = await tokenize(lambda: eng.encode_chat(messages, tools))
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from exc
    choices = submit_choices(request, body, [prompt_ids], adapter, "messages", grammar)
    named = body.tool_choice.function.name if isinstance(body.tool_choice, NamedToolChoice) else None
    outputs = [ToolOutput(mode, named) for _ in choices] if mode != "text" else None
    response_id = new_id("chatcmpl")
    text = token_text(request)
    if body.stream:
        report = Usage(body.include_usage(), body.continuous_usage())
        fmt = _tool_stream(outputs) if outputs is not None else chat_stream(text, body.logprobs)
        events = stream(choices, fmt, response_id, body.model, report, body.n)
        return StreamingResponse(events, media_type="text/event-stream")
    await collect(request, choices)
    replies = [_message(c, outputs[c.index] if outputs is not None else None) for c in choices]
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [
            {
                "index": c.index,
                "message": message,
                "logprobs": chat_logprobs(text, c.logprobs) if body.logprobs else None,
                "finish_reason": reason,
            }
            for c, (message, reason) in zip(choices, replies, strict=True)
        ],
        "usage": usage(choices, prompt_token_count(choices, body.n)),
    }
