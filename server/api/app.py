"""The FastAPI application: built by a factory whose lifespan loads the model and runs the engine."""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import Depends, FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import __version__
from server.adapters.loader import folder_loader
from server.api.auth import require_api_key, warn_if_open
from server.api.errors import APIError, error_response, install_error_handlers
from server.api.openapi import install_openapi
from server.api.request_id import RequestId
from server.api.routes import adapters as adapters_routes
from server.api.routes import chat, completions, health, metrics, models
from server.base_model import LoadedModel, load_base_model
from server.config import Settings
from server.engine.engine import Engine
from server.metrics import Metrics, StoreSnapshot
from server.registry.merge import MergeJobs, archive_builder, fold_into
from server.registry.store import Store, parse_adapter_flag
from server.torch_threads import on_own_thread

log = logging.getLogger("peftserve")

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


class BodyLimit:
    """Answer 413 as soon as a generation request's body passes the limit, without reading the rest."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        too_large = error_response(
            APIError(413, f"the request body exceeds {self.limit} bytes", code="request_too_large")
        )
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await too_large(scope, receive, send)
            return
        # Chunked bodies carry no length: buffer up to the limit, then replay to the app.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await too_large(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def read_chat_template(path: Path | None) -> str | None:
    """The text of --chat-template, read once at start."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--chat-template {path}: cannot read it ({exc.strerror})") from exc


def create_app(settings: Settings, model: LoadedModel | None = None) -> FastAPI:
    """The app; `model` skips loading (tests share one loaded model between apps)."""
    chat_template = read_chat_template(settings.model.chat_template)  # a bad path fails before the load

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        warn_if_open(settings.server)
        # Torch work off this thread, each on one that exits after it: see server/torch_threads.py.
        loaded = model if model is not None else on_own_thread(load_base_model, settings.model)
        adapters = settings.adapters
        validate = folder_loader(
            loaded, adapters.max_lora_rank, max_copy_bytes=adapters.max_module_copy_bytes
        )
        store = Store(
            adapters.store,
            dict(parse_adapter_flag(a) for a in adapters.adapter),
            validate=functools.partial(on_own_thread, validate),
            lookup=adapters.adapter_dir,
        )
        store.watch(adapters.store_refresh)
        source: Store | None = store
        if adapters.merge_adapter:
            loaded = on_own_thread(dedicate, loaded, store, adapters.merge_adapter, adapters.max_lora_rank)
            source = None  # one adapter, folded into the base: nothing else is served
        app.state.settings = settings
        app.state.metrics = Metrics()
        app.state.store = store
        app.state.merges = MergeJobs(archive_builder(store, loaded))
        app.state.metrics.watch_store(lambda: StoreSnapshot(**dataclasses.asdict(store.stats())))
        app.state.dedicated = adapters.merge_adapter is not None
        eng = on_own_thread(
            functools.partial(
                Engine,
                loaded,
                settings.engine,
                adapters,
                source=source,
                metrics=app.state.metrics,
                chat_template=chat_template,
            )
        )
        eng.start()
        app.state.engine = eng
        app.state.started = int(time.time())
        log.info("serving %s", loaded.name)
        try:
            yield
        finally:
            eng.stop()
            app.state.merges.stop()
            store.close()

    app = FastAPI(title="peftserve", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    install_openapi(app, settings.server)
    app.include_router(health.router)
    app.include_router(metrics.router)
    keyed = [Depends(require_api_key)]
    for module in (models, chat, completions, adapters_routes):
        app.include_router(module.router, dependencies=keyed)
    app.add_middleware(BodyLimit, limit=settings.server.max_request_bytes)
    app.add_middleware(RequestId)  # the outermost: a 413 from BodyLimit carries the id too
    return app


def dedicate(model: LoadedModel, store: Store, name: str, max_rank: int) -> LoadedModel:
    """Fold one store adapter into the base and serve the result under the adapter's name."""
    ref = store.resolve(name)
    weights = folder_loader(model, max_rank)(store.verified_path(ref))
    fold_into(model, weights)
    log.info("merged %s (version %d) into the base; serving only %s", ref.name, ref.version, ref.name)
    return dataclasses.replace(model, name=ref.name)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


class DrainingServer(uvicorn.Server):
    """uvicorn, with a bounded graceful shutdown.

    The first SIGTERM or Ctrl-C drains: the server keeps listening but answers new generation
    requests 503 with Retry-After, while accepted ones get `drain_timeout` seconds to finish;
    those still running then end with an error (a stream's error chunk, or a 503), and the
    process exits 0. A second signal exits at once.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float) -> None:
        super().__init__(config)
        self.app, self.drain_timeout = app, drain_timeout
        self.draining: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        engine: Engine | None = getattr(self.app.state, "engine", None)
        if engine is None or self.draining is not None:
            self.force_exit = self.draining is not None
            super().handle_exit(sig, frame)
            return
        log.info(
            "%s: draining; requests in flight get up to %g s to finish (--drain-timeout)",
            signal.Signals(sig).name,
            self.drain_timeout,
        )
        self.draining = threading.Thread(
            target=self._drain, args=(engine,), name="peftserve-drain", daemon=True
        )
        self.draining.start()

    def _drain(self, engine: Engine) -> None:
        timeout = self.drain_timeout
        if not engine.drain(timeout):
            log.warning("drain timeout of %g s reached: ending the requests still running", timeout)
            engine.stop(f"the server shut down before this request finished (--drain-timeout {timeout:g} s)")
        self.should_exit = True


def run_server(settings: Settings) -> None:
    """Load the model and serve until a signal; the first one drains (see DrainingServer)."""
    configure_logging(settings.server.log_level)
    server = settings.server
    log.info("peftserve %s starting on http://%s:%d", __version__, server.host, server.port)
    app = create_app(settings)
    config = uvicorn.Config(app, host=server.host, port=server.port, log_level=server.log_level)
    DrainingServer(config, app, server.drain_timeout).run()


Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
