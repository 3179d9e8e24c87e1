"""Liveness: answers once the model is loaded, while the engine's step loop runs and moves."""

from fastapi import APIRouter, Request

from server.api.errors import APIError, documented

router = APIRouter(tags=["health"])


@router.get("/health", responses=documented(503))
async def health(request: Request) -> dict[str, str]:
    engine = request.app.state.engine
    if not engine.alive:
        raise APIError(503, "the engine's step loop has stopped; see the server log")
    if engine.draining:
        raise APIError(503, "the server is shutting down", headers={"Retry-After": "1"})
    bound = request.app.state.settings.engine.stall_timeout
    stalled = engine.stalled_for()
    if stalled > bound:
        raise APIError(
            503,
            f"a request has waited {stalled:.0f} s with nothing running (bound: --stall-timeout {bound:g} s)",
        )
    return {"status": "ok"}
