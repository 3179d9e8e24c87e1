"""GET /v1/models: the base model and every adapter, in OpenAI's list shape."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from server.api.generation import engine

router = APIRouter(tags=["models"])


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    eng = engine(request)
    created = request.app.state.started
    base = eng.model.name
    data = [
        {
            "id": base,
            "object": "model",
            "created": created,
            "owned_by": "peftserve",
            "root": base,
            "parent": None,
        }
    ]
    return {"object": "list", "data": data}
