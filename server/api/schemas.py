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

MAX_CHAT_LOGPROBS = 20  # OpenAI's limits: top_logprobs on chat, logprobs on completions
MAX_COMPLETION_LOGPROBS = 5

UNSUPPORTED = {
    "frequency_penalty": "frequency_penalty is not supported by this server; leave it out (or 0)",
    "presence_penalty": "presence_penalty is not supported by this server; leave it out (or 0)",
    "best_of": "best_of is not supported by this server; leave it out (or 1), or ask for n choices",
    "suffix": "suffix (insertion) is not supported by this server; leave it out",
    "functions": "functions (the deprecated form of tools) is not supported by this server; leave it out",
    "function_call": 'function_call is not supported by this server; leave it out (or "none")',
    "audio": "audio output is not supported by this server; leave `audio` out",
    "modalities": 'only text output is supported; leave `modalities` out (or ["text"])',
    "prediction": "predicted outputs are not supported by this server; leave `prediction` out",
    "reasoning_effort": "reasoning_effort is not supported by this server; leave it out",
    "verbosity": "verbosity is not supported by this server; leave it out",
    "web_search_options": "web search is not supported by this server; leave `web_search_options` out",
    "store": "stored completions are not supported by this server; leave `store` out (or false)",
    "service_tier": 'service tiers are not supported by this server; leave `service_tier` out (or "auto")',
}
"""Field -> why it is refused; any value other than the one that changes nothing is a 400."""

UNSUPPORTED_ON = {
    "/v1/chat/completions": {"echo": "echo applies to /v1/completions only; leave it out (or false) here"},
}
"""The same, for fields refused on one route only."""


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
    continuous_usage_stats: bool = False
    """vLLM's: with include_usage, every chunk carries the usage so far."""


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
    frequency_penalty: Annotated[float, Field(ge=0, le=0)] | None = None
    presence_penalty: Annotated[float, Field(ge=0, le=0)] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        """Usage on every streamed chunk: vLLM's continuous_usage_stats, which needs include_usage."""
        return self.include_usage() and bool(
            self.stream_options and self.stream_options.continuous_usage_stats
        )

    def logprobs_wanted(self) -> int | None:
        """Alternatives to report per generated token; None: no log-probabilities."""
        raise NotImplementedError

    def prompt_logprobs_wanted(self) -> int | None:
        """Alternatives to report per prompt token; None: the prompt is not scored."""
        return None

    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), v) for k, v in (self.logit_bias or {}).items())

    def guided(self) -> list[tuple[str, object]]:
        """The vLLM guided_* fields that were given, as (field, value)."""
        fields = ("guided_json", "guided_regex", "guided_choice")
        return [(f, getattr(self, f)) for f in fields if getattr(self, f) is not None]


class ChatCompletionRequest(_Generation):
    # The schema says what the validator below does: top_logprobs needs logprobs: true.
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"top_logprobs": {"type": "integer"}}, "required": ["top_logprobs"]},
            "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
        }
    )

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_CHAT_LOGPROBS), BeforeValidator(_integral)] | None = None
    echo: Literal[False] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # Refused unless they ask for nothing (UNSUPPORTED): their types admit only that value.
    functions: None = None
    function_call: Literal["none"] | None = None
    audio: None = None
    modalities: list[Literal["text"]] | None = None
    prediction: None = None
    reasoning_effort: None = None
    verbosity: None = None
    web_search_options: None = None
    store: Literal[False] | None = None
    service_tier: Literal["auto", "default"] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Generation):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    )
    max_tokens: Annotated[int, Field(ge=0), BeforeValidator(_integral)] | None = 16
    """0 generates nothing: with echo and logprobs, it scores the prompt."""
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS), BeforeValidator(_integral)] | None = (
        None
    )
    echo: bool = False
    # Refused unless they ask for nothing (UNSUPPORTED): their types admit only that value.
    best_of: Annotated[int, Field(ge=1, le=1), BeforeValidator(_integral)] | None = None
    suffix: Annotated[str, Field(max_length=0)] | None = None

    def completion_limit(self) -> int | None:
        return self.max_tokens

    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    def prompt_logprobs_wanted(self) -> int | None:
        """An echoed prompt is always scored (then its text and tokens come from the same event)."""
        return (self.logprobs or 0) if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]
