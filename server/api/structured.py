"""Which grammar a request's output must follow: response_format, vLLM's guided_* fields, tools.

Plain data only: a request body in, a GrammarSpec (or None) out. The engine compiles and applies it.
"""

from __future__ import annotations

import json

from server.api.errors import APIError
from server.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    JsonObjectFormat,
    JsonSchemaFormat,
    NamedToolChoice,
    Tool,
)
from server.engine.grammar import GrammarSpec

NO_ARGUMENTS = {"type": "object", "properties": {}}


def _schema_object(value: dict | str, param: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise APIError(400, f"{param}: not valid JSON ({exc})", param=param) from exc
    if not isinstance(value, dict):
        raise APIError(400, f"{param}: a JSON schema must be an object", param=param)
    return value


def guided_spec(body: ChatCompletionRequest | CompletionRequest) -> GrammarSpec | None:
    """The grammar named by response_format or one guided_* field; 400 if more than one is given."""
    given = body.guided()
    response_format = getattr(body, "response_format", None)
    if response_format is not None and response_format.type != "text":
        given.append(("response_format", response_format))
    if len(given) > 1:
        names = ", ".join(name for name, _ in given)
        raise APIError(400, f"{given[1][0]}: give one of {names}, not several", param=given[1][0])
    if not given:
        return None
    name, value = given[0]
    if isinstance(value, JsonObjectFormat):
        return GrammarSpec.json_schema({"type": "object"}, name)
    if isinstance(value, JsonSchemaFormat):
        schema = value.json_schema.schema_
        return GrammarSpec.json_schema(schema if schema is not None else {"type": "object"}, name)
    if name == "guided_json":
        return GrammarSpec.json_schema(_schema_object(value, name), name)  # type: ignore[arg-type]
    if name == "guided_regex":
        return GrammarSpec("regex", value, name)  # type: ignore[arg-type]
    return GrammarSpec("choice", json.dumps(value), name)


def parameters_schema(tool: Tool) -> dict:
    return tool.function.parameters if tool.function.parameters is not None else NO_ARGUMENTS


def tool_call_spec(tools: list[Tool], choice: str | NamedToolChoice, parallel: bool) -> GrammarSpec:
    """The grammar of a forced call: a named function's arguments object, or for `required` a JSON
    array of {"name", "parameters"} objects (vLLM's form), one item when parallel calls are off."""
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        return GrammarSpec.json_schema(parameters_schema(tool), "tool_choice")
    item = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "parameters": parameters_schema(t)},
                "required": ["name", "parameters"],
            }
            for t in tools
        ]
    }
    array: dict = {"type": "array", "items": item, "minItems": 1}
    if not parallel:
        array["maxItems"] = 1
    return GrammarSpec.json_schema(array, "tool_choice")
