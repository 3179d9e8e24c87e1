"""Tool calls on chat: which mode a request asks for, and its output as OpenAI's message and stream.

Modes (`tool_choice`): `none` shows the model no tools and returns text; `auto` (the default with
tools) lets the model write Hermes-style calls, `<tool_call>{"name": ..., "arguments": {...}}
</tool_call>`, parsed from its text; `required` and a named function are forced by a grammar
(structured.tool_call_spec), so their arguments always parse and follow the parameters schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from server.api.errors import APIError
from server.api.schemas import ChatCompletionRequest, Message, NamedToolChoice

ToolMode = Literal["text", "auto", "required", "named"]
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CALL_CLOSE) + r"|$)", re.S)


def tool_mode(body: ChatCompletionRequest) -> ToolMode:
    """The request's mode; 400 for a tool_choice that names no given tool."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice: there are no `tools` to choose from", param="tool_choice")
        return "text"
    if choice == "none":
        return "text"
    if isinstance(choice, NamedToolChoice):
        names = [t.function.name for t in body.tools]
        if choice.function.name not in names:
            raise APIError(
                400,
                f"tool_choice: no tool named {choice.function.name!r} (tools: {', '.join(names)})",
                param="tool_choice",
            )
        return "named"
    return "required" if choice == "required" else "auto"


def template_message(message: Message) -> dict[str, Any]:
    """A message as chat templates take it: text content, and tool calls with their arguments as
    objects (templates render them with `tojson`)."""
    out: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.tool_calls:
        calls = []
        for i, call in enumerate(message.tool_calls):
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError as exc:
                param = f"messages.tool_calls.{i}.function.arguments"
                raise APIError(400, f"{param}: not valid JSON ({exc})", param=param) from exc
            function = {"name": call.function.name, "arguments": arguments}
            calls.append({"id": call.id, "type": "function", "function": function})
        out["tool_calls"] = calls
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def parse_hermes(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content before the calls or None, calls) of a Hermes-style reply; ([text], []) when any
    call does not parse, so a malformed call reaches the client as text rather than vanishing."""
    start = text.find(CALL_OPEN)
    if start < 0:
        return text, []
    calls = []
    for body in _CALL.findall(text[start:]):
        try:
            call = json.loads(body)
        except ValueError:
            return text, []
        arguments = call.get("arguments", call.get("parameters", {})) if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or arguments is None:
            return text, []
        calls.append(_call(call["name"], json.dumps(arguments, ensure_ascii=False)))
    content = text[:start].strip()
    return (content or None), calls


def parse_required(text: str) -> list[dict[str, Any]]:
    """Calls of a `required` reply (a JSON array of {"name", "parameters"}); [] if cut short."""
    try:
        items = json.loads(text)
    except ValueError:
        return []
    return [_call(i["name"], json.dumps(i["parameters"], ensure_ascii=False)) for i in items]


@dataclass
class ToolOutput:
    """One choice's reply in a tool mode (not "text"), whole or streamed."""

    mode: ToolMode
    function: str | None = None
    """The named function (mode named)."""
    text: list[str] = field(default_factory=list)
    streamed: int = 0
    """Characters of text already sent as content (mode auto)."""
    call_id: str = field(default_factory=new_call_id)

    def _calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        if self.mode == "named":
            return None, [{**_call(self.function or "", text), "id": self.call_id}]
        if self.mode == "required":
            calls = parse_required(text)
            return (None if calls else text), calls
        return parse_hermes(text)

    def message(self, text: str, reason: str) -> tuple[dict[str, Any], str]:
        """The whole reply: (message, finish_reason). A reply cut by max_tokens keeps "length"."""
        content, calls = self._calls(text) if reason != "length" or self.mode == "named" else (text, [])
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        return message, ("tool_calls" if calls and reason == "stop" else reason)

    # ---- streaming: each method returns the delta payloads of one choice ----

    def start(self) -> dict[str, Any]:
        if self.mode == "named":
            call = {"index": 0, "id": self.call_id, "type": "function"}
            call["function"] = {"name": self.function, "arguments": ""}
            return {"role": "assistant", "content": None, "tool_calls": [call]}
        return {"role": "assistant", "content": None if self.mode == "required" else ""}

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.text.append(text)
        if self.mode == "named":
            return [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}]
        if self.mode == "required":
            return []  # sent whole at the end, once the array parses
        return self._auto_content()

    def _auto_content(self) -> list[dict[str, Any]]:
        """auto: text before a call streams as content; from `<tool_call>` on it is held until the end."""
        whole = "".join(self.text)
        found = whole.find(CALL_OPEN)
        if found >= 0:
            end = found
        else:  # hold back a tail that may be the start of `<tool_call>`
            end = len(whole)
            for n in range(min(len(CALL_OPEN) - 1, len(whole)), 0, -1):
                if whole.endswith(CALL_OPEN[:n]):
                    end -= n
                    break
        if end <= self.streamed:
            return []
        out, self.streamed = whole[self.streamed : end], end
        return [{"content": out}]

    def end(self, reason: str) -> tuple[list[dict[str, Any]], str]:
        """The deltas still owed when the choice ends, and its finish_reason."""
        whole = "".join(self.text)
        if self.mode == "named":
            return [], ("tool_calls" if reason == "stop" else reason)
        content, calls = self._calls(whole) if reason != "length" else (whole, [])
        deltas: list[dict[str, Any]] = []
        if calls:
            for index, call in enumerate(calls):
                head = {"index": index, "id": call["id"], "type": "function"}
                head["function"] = {"name": call["function"]["name"], "arguments": ""}
                deltas.append({"tool_calls": [head]})
                arguments = call["function"]["arguments"]
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
            return deltas, ("tool_calls" if reason == "stop" else reason)
        rest = whole[self.streamed :] if self.mode == "auto" else (content or "")
        return ([{"content": rest}] if rest else []), reason
