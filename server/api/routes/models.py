"""GET /v1/models: the base model and every adapter, in OpenAI's list shape; GET /v1/models/{id}: one."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from server.api.errors import APIError, documented
from server.api.generation import engine
from server.engine.request import UnknownModel

router = APIRouter(tags=["models"])
PAGE_MAX = 10_000


def _model(model_id: str, created: int, base: str, parent: str | None) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "peftserve",
        "root": base,
        "parent": parent,
    }


@router.get("/v1/models", responses=documented(400, 401, 403))
async def list_models(
    request: Request,
    limit: Annotated[
        int | None, Query(ge=1, le=PAGE_MAX, description="at most this many; default all")
    ] = None,
    after: Annotated[str | None, Query(description="list the models after this id")] = None,
) -> dict[str, Any]:
    """The base model first, then the adapters by name; `limit` and `after` page through a large store."""
    created = request.app.state.started
    base = engine(request).model.name
    if request.app.state.dedicated:  # one adapter folded into the base is the only model served
        data = [] if after is not None else [_model(base, created, base, None)]
        return {"object": "list", "data": data, "has_more": False}
    head = [_model(base, created, base, None)] if after is None else []
    wanted = None if limit is None else limit - len(head)
    store = request.app.state.store
    entries, more = store.page(
        None if after in (None, base) else after, wanted if wanted is not None else 2**31
    )
    models = [*head, *(_model(e.latest.ref.name, created, base, base) for e in entries)]
    if wanted == 0:
        more = bool(store.page(None, 1)[0])
    return {"object": "list", "data": models, "has_more": more}


@router.get("/v1/models/{model_id:path}", responses=documented(401, 403, 404))
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    """One model: the base, or an adapter by name; 404 in OpenAI's shape if there is none."""
    eng = engine(request)
    base = eng.model.name
    try:
        ref = eng.resolve_model(model_id)
    except UnknownModel as exc:
        raise APIError(404, str(exc), param="model", code="model_not_found") from exc
    created = request.app.state.started
    return _model(model_id, created, base, None if ref is None else base)
