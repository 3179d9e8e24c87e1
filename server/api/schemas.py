"""Request bodies of the OpenAI-compatible endpoints.

Unknown fields are ignored, as OpenAI does, but known fields are strict: `"max_tokens": "8"` or a
token id `false` is refused rather than coerced. Fields of OpenAI's API that this server cannot
honour yet are refused with a 400 naming the field (see UNSUPPORTED) instead of being ignored,
so a client that relies on them fails at once and clearly.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

MAX_N = 16
MAX_STOP = 16
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
TOP_K_MAX = 2**31 - 1  # beyond any vocabulary; larger ones overflowed the sampler's tensor
MAX_LOGIT_BIAS = 1024
MAX_TOOLS = 128
MAX_CHOICES = 256

UNSUPPORTED = {
    "logprobs": "logprobs are not supported by this server yet; leave `logprobs` out (or false)",
    "top_logprobs": "logprobs are not supported by this server yet; leave `top_logprobs` out",
    "echo": "echo is not supported by this server yet; leave `echo` out (or false)",
}
"""Field -> why it is refused; any value other than the one that changes nothing is a 400."""


def _integral(value: object) -> object:
    """JSON Schema counts 1.0 as an integer: take it as 1 (strict mode alone would refuse it)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Integer fields take 8 and 8.0, never "8", true or 8.5. Constraints come before the validator
# (which still runs first): after it, pydantic writes `ge` into the schema instead of `minimum`.
Int = Annotated[int, BeforeValidator(_integral)]
TokenId = Annotated[int, Field(ge=0), BeforeValidator(_integral)]
Count = Annotated[int, Field(ge=1), BeforeValidator(_integral)]


def _seed(value: object) -> object:
    """A number just past a bound that reads as the bound when taken as a double (2**63 does, as
    do 2**63 + 1000 and the float 9.223372036854776e18) is the bound: JSON readers, schema
    validators among them, compare numbers as doubles, and such a seed is valid to them."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        for bound in (SEED_MIN, SEED_MAX):
            if value != bound and float(value) == float(bound):
                return bound
    return _integral(value)


Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX), BeforeValidator(_seed)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str = Field(min_length=1)
    arguments: str
    """The arguments as JSON text, as OpenAI sends them."""


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    # The schema says what the validator below does: a tool message has content.
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"role": {"const": "tool"}}, "required": ["role"]},
            "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        }
    )

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(default=None, validate_default=True)
    tool_calls: list[ToolCall] | None = None
    """An assistant message's calls (rendered by the chat template)."""
    tool_call_id: str | None = None
    """A tool message's answer to this call."""
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _tool_content(cls, value: str | list[TextPart] | None, info: ValidationInfo):
        if value is None and info.data.get("role") == "tool":
            raise ValueError("a tool message needs content")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class TextFormat(_Body):
    type: Literal["text"]


class JsonObjectFormat(_Body):
    type: Literal["json_object"]


class JsonSchema(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    """None: any JSON object."""
    strict: bool | None = None


class JsonSchemaFormat(_Body):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class FunctionDefinition(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict | None = None
    """A JSON schema of the arguments object; None takes no arguments."""
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


# Keys are token ids as decimal strings, as OpenAI takes them; the schema says so too
# (patternProperties with no other properties), so schema-driven clients send nothing else.
LogitBias = Annotated[
    dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]],
    Field(max_length=MAX_LOGIT_BIAS, json_schema_extra={"additionalProperties": False}),
]


class _Generation(_Body):
    model: str = Field(min_length=1)
    max_tokens: Count | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    top_k: Int = Field(default=0, ge=-1, le=TOP_K_MAX)
    seed: Seed | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    n: Int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    logit_bias: LogitBias | None = None
    # vLLM's structured outputs; at most one of them (and not with response_format or tools).
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)] | None = None
    # Refused unless they ask for nothing (UNSUPPORTED): their types admit only that value.
    echo: Literal[False] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), v) for k, v in (self.logit_bias or {}).items())

    def guided(self) -> list[tuple[str, object]]:
        """The vLLM guided_* fields that were given, as (field, value)."""
        fields = ("guided_json", "guided_regex", "guided_choice")
        return [(f, getattr(self, f)) for f in fields if getattr(self, f) is not None]


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: Literal[False] | None = None
    top_logprobs: None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Generation):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    )
    max_tokens: Count | None = 16
    logprobs: None = None

    def completion_limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]
