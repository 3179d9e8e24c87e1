"""The Ray Serve application: an ingress, N engine replicas, and a directory of their metrics.

The ingress reads the `model` field of a request and, when it names an adapter, asks Ray Serve
for that model id (`multiplexed_model_id`): Ray's router then prefers a replica that has claimed
the adapter (`serve.multiplexed`), falls back to the replica holding the fewest adapters when none
has it or those that do stay full for about a second. The replica runs the request through its
whole peftserve app, so the engine batches it with whatever else that replica is running, of
any adapter; nothing here batches by model id.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import ray
from prometheus_client import CONTENT_TYPE_LATEST, start_http_server
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from deploy.ray.asgi import HTTPRequest, Lifespan, ResponseStart, call
from deploy.ray.metrics import merge_expositions
from deploy.ray.settings import RaySettings
from server.api.errors import APIError, error_body, error_response
from server.config import Settings

log = logging.getLogger("ray.serve")  # what Ray Serve writes to each replica's log file

REPLICA_HEADER = "x-peftserve-replica"
"""Response header naming the replica that answered."""
ATTEMPTS = 3
"""Tries per generation or GET request when the replica it went to dies before answering."""
INGRESS_MAX_ONGOING_REQUESTS = 4096
"""The ingress only relays; the engine replicas' limits are what bound the work."""
SCRAPE_TIMEOUT_SECONDS = 10.0
ANNOUNCE_SECONDS = 30.0
"""How often a replica tells the directory again where its metrics are."""


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Directory:
    """Where each live engine replica serves its own Prometheus metrics."""

    def __init__(self) -> None:
        self.urls: dict[str, str] = {}

    def register(self, replica: str, url: str) -> None:
        self.urls[replica] = url

    def forget(self, replica: str) -> None:
        self.urls.pop(replica, None)

    def replicas(self) -> dict[str, str]:
        return dict(self.urls)


@serve.deployment
class EngineReplica:
    """One whole peftserve (app, engine, store), driven in-process without a socket."""

    async def __init__(self, settings: Settings, directory: DeploymentHandle) -> None:
        from server.api.app import configure_logging, create_app  # keeps torch out of the ingress

        configure_logging(settings.server.log_level)
        self.app = create_app(settings)
        self.lifespan = Lifespan(self.app)
        await self.lifespan.start()
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()

        async def claim(model_id: str) -> str:
            return model_id

        # Ray's router prefers replicas that claimed a model id and forgets a replica's least
        # recently used claim past the limit, as the engine's device slots forget adapters.
        limit = settings.adapters.max_active_adapters
        self.claim = serve.multiplexed(max_num_models_per_replica=limit)(claim)
        host = ray.util.get_node_ip_address()
        self.metrics_server, _ = start_http_server(0, host, registry=self.app.state.metrics.registry)
        netloc = f"[{host}]" if ":" in host else host
        url = f"http://{netloc}:{self.metrics_server.server_port}/metrics"
        await directory.register.remote(self.replica, url)
        self.announcer = asyncio.create_task(self.announce(directory, url))

    async def announce(self, directory: DeploymentHandle, url: str) -> None:
        """Register again now and then: a restarted directory starts empty, the ingress forgets
        a replica whose scrape failed once."""
        while True:
            await asyncio.sleep(ANNOUNCE_SECONDS)
            try:
                await directory.register.remote(self.replica, url)
            except Exception as exc:  # the directory is restarting or gone; try again later
                log.warning("could not register the metrics of %s: %s", self.replica, exc)

    async def forward(self, request: HTTPRequest) -> AsyncIterator[ResponseStart | bytes]:
        """Answer one HTTP request: a `ResponseStart`, then the body as the app sends it."""
        model = serve.get_multiplexed_model_id()
        async for part in call(self.app, request, self.replica):
            if model and isinstance(part, ResponseStart) and part.status < 400:
                await self.claim(model)
            yield part

    def served_name(self) -> str:
        """The name the base model is served under (the merged adapter's, when dedicated)."""
        return self.app.state.engine.model.name

    def check_health(self) -> None:
        """Ray Serve replaces a replica whose engine step loop has stopped."""
        if not self.app.state.engine.alive:
            raise RuntimeError("the engine's step loop has stopped; see the replica's log")

    async def __del__(self) -> None:
        # No goodbye to the directory: it may be going down too, and the ingress drops a replica
        # whose metrics stop answering.
        self.announcer.cancel()
        await self.lifespan.stop()
        self.metrics_server.shutdown()


def requested_model(request: HTTPRequest) -> str | None:
    """The `model` field of a JSON request body, if there is one."""
    if request.method != "POST":
        return None
    try:
        body = json.loads(request.body)
    except ValueError:
        return None  # the replica answers 400
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) and model else None


class Relayed(Response):
    """A replica's response, relayed part by part as it arrives."""

    def __init__(self, start: ResponseStart, parts: DeploymentResponseGenerator) -> None:
        self.status_code = start.status
        self.raw_headers = [*start.headers, (REPLICA_HEADER.encode(), start.replica.encode())]
        self.background = None
        self.parts = parts

    def _streams_events(self) -> bool:
        return any(
            k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in self.raw_headers
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        finished = False
        try:
            async for chunk in self.parts:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finished = True
        except RayActorError as exc:
            # Too late to retry: the client has part of the answer. Say why the stream ends early.
            log.warning("replica died mid-response: %s", exc)
            if self._streams_events():
                error = error_body(503, "the replica serving this stream died; retry the request")
                await send(
                    {
                        "type": "http.response.body",
                        "body": f"data: {json.dumps(error)}\n\n".encode(),
                        "more_body": True,
                    }
                )
        finally:
            if not finished:
                self.parts.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@serve.deployment(max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 0})
class Ingress:
    """The OpenAI-compatible HTTP entry: relays each request to an engine replica."""

    def __init__(self, replicas: DeploymentHandle, directory: DeploymentHandle, affinity: bool) -> None:
        self.replicas = replicas
        self.directory = directory
        self.affinity = affinity
        self.base_name: str | None = None
        self.scraper = httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_SECONDS)

    async def __call__(self, request: Request) -> Response:
        if request.method == "GET" and request.scope["path"] == "/metrics":
            return await self.metrics()
        forwarded = HTTPRequest(
            request.method,
            request.scope["path"],
            request.scope["query_string"],
            list(request.scope["headers"]),
            await request.body(),
        )
        return await self.forward(forwarded, await self.adapter(forwarded))

    async def adapter(self, request: HTTPRequest) -> str | None:
        """The model id to route by: the adapter the request names; None for the base model."""
        model = requested_model(request) if self.affinity else None
        if model is None:
            return None
        if self.base_name is None:
            self.base_name = await self.replicas.served_name.remote()
        return None if model == self.base_name else model

    async def forward(self, request: HTTPRequest, adapter: str | None) -> Response:
        handle = self.replicas.options(stream=True)
        if adapter:
            handle = handle.options(multiplexed_model_id=adapter)
        # Generation and reads are safe to run again; an upload or delete may have taken effect.
        attempts = ATTEMPTS if request.method == "GET" or requested_model(request) else 1
        for attempt in range(1, attempts + 1):
            parts: DeploymentResponseGenerator = handle.forward.remote(request)
            try:
                start = await anext(parts)
            except RayActorError as exc:
                # The replica died before it answered: nothing reached the client, so try another.
                log.warning(
                    "%s %s: replica died (try %d of %d): %s",
                    request.method,
                    request.path,
                    attempt,
                    attempts,
                    exc,
                )
                continue
            return Relayed(start, parts)
        return error_response(APIError(503, f"the replica died before it answered ({attempts} tries)"))

    async def metrics(self) -> Response:
        """Every live replica's metrics in one exposition, labelled by replica."""
        urls: dict[str, str] = await self.directory.replicas.remote()
        texts = await asyncio.gather(*(self.scrape(url) for url in urls.values()))
        live = {}
        for replica, text in zip(urls, texts, strict=True):
            if text is None:
                await self.directory.forget.remote(replica)
            else:
                live[replica] = text
        return Response(merge_expositions(live), media_type=CONTENT_TYPE_LATEST)

    async def scrape(self, url: str) -> str | None:
        try:
            response = await self.scraper.get(url)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("dropping replica metrics at %s: %s", url, exc)
            return None
        return response.text


def absolute_paths(settings: Settings) -> Settings:
    """Settings whose local paths hold in any working directory (Ray workers do not share ours)."""
    model, adapters = settings.model, settings.adapters
    flags = [
        f"{name}={Path(path).resolve()}" if sep else name
        for name, sep, path in (a.partition("=") for a in adapters.adapter)
    ]
    local_model = model.model is not None and Path(model.model).exists()
    return settings.model_copy(
        update={
            "model": model.model_copy(
                update={
                    "cache": model.cache.resolve(),
                    "model": str(Path(model.model).resolve()) if local_model else model.model,
                }
            ),
            "adapters": adapters.model_copy(update={"store": adapters.store.resolve(), "adapter": flags}),
        }
    )


def engine_options(settings: Settings, ray_settings: RaySettings) -> dict[str, Any]:
    """Ray Serve options for the engine replicas: how many, how loaded, on what resources."""
    r = ray_settings
    if r.max_replicas is None:
        scale: dict[str, Any] = {"num_replicas": r.replicas}
    else:
        scale = {
            "autoscaling_config": {
                "min_replicas": r.replicas,
                "max_replicas": r.max_replicas,
                "target_ongoing_requests": r.target_ongoing_requests,
            }
        }
    return {
        **scale,
        "max_ongoing_requests": r.max_ongoing_requests or settings.engine.max_batch_size,
        "ray_actor_options": {"num_cpus": r.replica_cpus, "num_gpus": r.replica_gpus},
    }


def build_app(settings: Settings, ray_settings: RaySettings) -> serve.Application:
    """The application graph: the ingress holds handles to the engine replicas and the directory."""
    directory = Directory.bind()
    replicas = EngineReplica.options(**engine_options(settings, ray_settings)).bind(
        absolute_paths(settings), directory
    )
    return Ingress.bind(replicas, directory, ray_settings.affinity)
