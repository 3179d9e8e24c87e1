"""Schemathesis hooks for the fuzz run (loaded through SCHEMATHESIS_HOOKS by test_fuzz.py).

A schema cannot say which `model` names exist, how long a context is, or how large the
vocabulary is, so schema-valid requests would almost all end in a 404 and never reach the
engine, or in a 400 `context_length_exceeded`. For *positive* cases only, these hooks point
most requests at real models and adapters and keep what the schema cannot bound (token ids,
max_tokens, prompt and message lengths, whether a JSON schema or regex compiles, which tool a
tool_choice names, whether tool call arguments are JSON) within what the served model takes.
Negative cases are sent as generated.
"""

from __future__ import annotations

import os
import zlib

import schemathesis
from schemathesis.core.parameters import ParameterLocation

MODELS = os.environ.get("PEFTSERVE_FUZZ_MODELS", "").split(",")
VOCAB = int(os.environ.get("PEFTSERVE_FUZZ_VOCAB", "1000"))
MAX_NEW_TOKENS = 4
# Well inside the tiny model's 512-token context even at 4 tokens a character.
PROMPT_CHARS, PROMPT_IDS = 96, 256
MESSAGES, MESSAGE_CHARS = 6, 12
TOOLS = 2
GRAMMAR_FIELDS = ("guided_json", "guided_regex", "guided_choice", "response_format")


def _pick(value: str, choices: list[str]) -> str:
    """A real name for most values, the generated one for a few (so 404s stay covered)."""
    slot = zlib.crc32(value.encode("utf-8", "replace")) % (len(choices) + 1)
    return value if slot == len(choices) else choices[slot]


def _positive(case, location: ParameterLocation) -> bool:
    meta = case.meta
    if meta is None:
        return False
    component = meta.components.get(location)
    return (component.mode if component else meta.generation.mode).is_positive


def _tame_generation(body: dict) -> None:
    if isinstance(body.get("model"), str) and body["model"]:
        body["model"] = _pick(body["model"], MODELS)
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(field), int | float) and not isinstance(body.get(field), bool):
            body[field] = min(body[field], MAX_NEW_TOKENS)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_NEW_TOKENS  # no limit means the rest of the context
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        body["prompt"] = prompt[:PROMPT_CHARS]
    elif isinstance(prompt, list):
        body["prompt"] = [_tame_prompt(p) for p in prompt[:PROMPT_IDS]]
    messages = body.get("messages")
    if isinstance(messages, list):
        body["messages"] = [_tame_message(m) for m in messages[:MESSAGES]]
    if isinstance(body.get("logit_bias"), dict):
        body["logit_bias"] = {str(int(k) % VOCAB): v for k, v in body["logit_bias"].items()}
    _tame_grammar(body)
    _tame_tools(body)


def _tame_grammar(body: dict) -> None:
    """One grammar field at most, and one that compiles (a random schema or regex seldom does)."""
    given = [f for f in GRAMMAR_FIELDS if body.get(f) is not None]
    for field in given[1:]:
        body.pop(field)
    if body.get("guided_json") is not None:
        body["guided_json"] = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}}
    if body.get("guided_regex") is not None:
        body["guided_regex"] = "[a-z]{1,4}"
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and isinstance(response_format.get("json_schema"), dict):
        response_format["json_schema"]["schema"] = {"type": "object"}


def _tame_tools(body: dict) -> None:
    """A few tools taking no arguments (their schemas stay compilable and the prompt short); a
    named tool_choice names one of them; tool_choice only with tools; no grammar field beside a
    forced call; call arguments that are JSON."""
    tools = body.get("tools")
    if isinstance(tools, list):
        body["tools"] = tools = tools[:TOOLS]
        for tool in tools:
            if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
                tool["function"].pop("parameters", None)
                tool["function"].pop("description", None)
    choice = body.get("tool_choice")
    if not tools:
        body.pop("tool_choice", None)
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        first = tools[0].get("function", {}) if isinstance(tools[0], dict) else {}
        choice["function"]["name"] = first.get("name", "")
    if body.get("tools") and (
        body.get("tool_choice") == "required" or isinstance(body.get("tool_choice"), dict)
    ):
        for field in GRAMMAR_FIELDS:
            body.pop(field, None)
    for message in body.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("tool_calls"), list):
            for call in message["tool_calls"]:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    call["function"]["arguments"] = "{}"


def _tame_prompt(prompt):
    if isinstance(prompt, list):
        return [t % VOCAB if _is_int(t) else t for t in prompt[:PROMPT_IDS]]
    if isinstance(prompt, str):
        return prompt[:PROMPT_CHARS]
    return prompt % VOCAB if _is_int(prompt) else prompt


def _tame_message(message):
    if not isinstance(message, dict):
        return message
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = content[:MESSAGE_CHARS]
    elif isinstance(content, list):
        parts = content[:2]
        for part in parts:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                part["text"] = part["text"][: MESSAGE_CHARS // 2]
        message["content"] = parts
    return message


def _is_int(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()


@schemathesis.hook
def map_case(context, case):
    path = case.operation.path
    if path in ("/v1/completions", "/v1/chat/completions"):
        if isinstance(case.body, dict) and _positive(case, ParameterLocation.BODY):
            _tame_generation(case.body)
    elif "{name}" in path and isinstance(case.path_parameters, dict):
        name = case.path_parameters.get("name")
        if isinstance(name, str) and name and _positive(case, ParameterLocation.PATH):
            case.path_parameters["name"] = _pick(name, [m for m in MODELS[1:] if m])
    return case
