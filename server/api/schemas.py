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

UNSUPPORTED = {
    "logprobs": "logprobs are not supported by this server yet; leave `logprobs` out (or false)",
    "top_logprobs": "logprobs are not supported by this server yet; leave `top_logprobs` out",
    "echo": "echo is not supported by this server yet; leave `echo` out (or false)",
    "tools": "tool calling is not supported by this server yet; leave `tools` out",
    "tool_choice": 'tool calling is not supported by this server yet; leave `tool_choice` out (or "none")',
    "response_format": 'only {"type": "text"} is supported as response_format',
    "logit_bias": "logit_bias is not supported by this server yet; leave it out (or {})",
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
    # Refused unless they ask for nothing (UNSUPPORTED): their types admit only that value.
    echo: Literal[False] | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None
    response_format: TextFormat | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: Literal[False] | None = None
    top_logprobs: None = None
    tools: None = None
    tool_choice: Literal["none"] | None = None

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
