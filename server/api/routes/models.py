"""GET /v1/models: the base model and every adapter, in OpenAI's list shape."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from server.api.generation import engine

router = APIRouter(tags=["models"])


def _model(model_id: str, created: int, base: str, parent: str | None) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "peftserve",
        "root": base,
        "parent": parent,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    created = request.app.state.started
    base = engine(request).model.name
    if request.app.state.dedicated:  # one adapter folded into the base is the only model served
        return {"object": "list", "data": [_model(base, created, base, None)]}
    adapters = [_model(ref.name, created, base, base) for ref in request.app.state.store.names()]
    return {"object": "list", "data": [_model(base, created, base, None), *adapters]}
