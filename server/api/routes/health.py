"""Liveness: answers once the model is loaded, and while the engine's step loop runs."""

from fastapi import APIRouter, Request

from server.api.errors import APIError, documented

router = APIRouter(tags=["health"])


@router.get("/health", responses=documented(503))
async def health(request: Request) -> dict[str, str]:
    if not request.app.state.engine.alive:
        raise APIError(503, "the engine's step loop has stopped; see the server log")
    return {"status": "ok"}
