"""What flows between the API and the engine thread: requests in, events out."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


class EngineError(Exception):
    """Base of the errors the engine raises to its callers."""


class QueueFull(EngineError):
    """The waiting queue is at --max-queue."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the server is at capacity ({limit} requests waiting); retry shortly")
        self.limit = limit


class ContextLengthError(EngineError):
    """Prompt plus completion do not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int) -> None:
        super().__init__(
            f"this model's maximum context length is {limit} tokens; the request has {prompt_tokens} prompt "
            f"tokens and asks for {max_tokens} completion tokens ({prompt_tokens + max_tokens} in total)"
        )
        self.prompt_tokens, self.max_tokens, self.limit = prompt_tokens, max_tokens, limit


class UnknownModel(EngineError):
    """The request names neither the base model nor a known adapter."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the model '{name}' does not exist")
        self.name = name


class InvalidRequest(EngineError, ValueError):
    """A request parameter the engine cannot honour; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class EngineStopped(EngineError):
    """The engine is not running (starting up or shutting down)."""


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the row's adapter (log-softmax of the raw logits, before
    temperature or any other processing), and the most likely tokens at its position, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """New output: the token ids generated and the text that became final.

    `logprobs` (only when the request asked for them) has one entry per token sampled, including an
    end-of-sequence token that ended the request, which `token_ids` and the text leave out.
    """

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """Log-probabilities of the prompt's tokens, once, before any Delta; the first token has none."""

    logprobs: tuple[TokenLogprob | None, ...]


@dataclass(frozen=True)
class Finished:
    """The last event of a request."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Event = Delta | PromptLogprobs | Finished


@dataclass
class RequestHandle:
    """The caller's side of one request: its events, and a way to cancel it."""

    request_id: int
    _cancel: Callable[[int], None] = field(repr=False)
    _events: deque = field(default_factory=deque, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _ready: asyncio.Event | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._ready = asyncio.Event()
        except RuntimeError:
            self._loop = None

    def push(self, event: Event) -> None:
        """Called from the engine thread."""
        with self._lock:
            self._events.append(event)
        if self._loop is not None and self._ready is not None:
            # A closed loop means nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._ready.set)

    def drain(self) -> list[Event]:
        """Events so far, without waiting (for callers with no event loop)."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
        return events

    def cancel(self) -> None:
        self._cancel(self.request_id)

    async def __aiter__(self) -> AsyncIterator[Event]:
        if self._ready is None:
            raise RuntimeError("iterate a handle from the event loop that submitted it")
        while True:
            for event in self.drain():
                yield event
                if isinstance(event, Finished):
                    return
            await self._ready.wait()
            self._ready.clear()
