"""Session routes: the stored state summary and the edit a device applies locally."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response

from recsys.edit_codec import encode_edit
from serving.deps import Context
from serving.device import binary_sizes, device_edit
from serving.problems import problem_responses
from serving.routes.recommendations import SessionPath
from serving.schemas import EditLayer, ItemCounts, SessionEdit, SessionSummary

router = APIRouter(tags=["sessions"])


@router.get(
    "/v1/sessions/{session_id}",
    response_model=SessionSummary,
    summary="A session's stored state",
    responses=problem_responses(401, 403, 404, 422, 503),
)
def session_summary(session_id: SessionPath, ctx: Context) -> SessionSummary:
    s = ctx.ranker.session(session_id)
    return SessionSummary(
        session_id=s.session_id,
        device_id=s.device_id,
        user_id=s.user_id,
        event_count=s.event_count,
        recent_items=list(s.recent_items),
        prototype_id=s.prototype_id,
        edit_version=s.edit_version,
        model_version=s.model_version,
        last_event_at=s.last_event_at,
        updated_at=s.updated_at,
        item_counts=ItemCounts.model_validate(s.item_counts) if s.item_counts else None,
    )


EditFormat = Literal["json", "binary"]


@router.get(
    "/v1/sessions/{session_id}/edit",
    response_model=SessionEdit,
    summary="The session's edit, for on-device inference",
    description=(
        "ΔW (D×D) and Δb (D) per editable layer, exactly what the server adds when it ranks this session: "
        "a device holding model `model_version` applies `W_l + ΔW_l`, `b_l + Δb_l`, adds `item_bias` to the "
        "item scores and ranks locally. `format=binary` sends the compact layout of docs/device.md "
        "(float16 by default, `dtype=float32` on request; truncated-SVD factors of rank `rank`, by default the "
        "model's `edit_rank`, 0 = full ΔW). 404 for an unknown session; 409 while the session has no item the "
        "model knows."
    ),
    responses={
        200: {
            "content": {"application/json": {}, "application/octet-stream": {}},
            "description": "The edit (JSON, or the binary layout with format=binary)",
        },
        **problem_responses(401, 403, 404, 409, 422, 503),
    },
)
def session_edit(
    session_id: SessionPath,
    ctx: Context,
    format: Annotated[EditFormat, Query(description="json, or binary (docs/device.md).")] = "json",
    dtype: Annotated[Literal["float16", "float32"], Query(description="Binary arrays' type.")] = "float16",
    rank: Annotated[
        int | None, Query(ge=0, le=4096, description="Factor rank of the binary ΔW (default: the model's).")
    ] = None,
) -> Response:
    e = ctx.ranker.session_edit(session_id)
    r = ctx.models.get().cfg.edit_rank if rank is None else rank
    if format == "binary":
        data = encode_edit(device_edit(e, r), dtype)
        headers = {"X-Persona-Model-Version": e.model_version, "X-Persona-Edit-Version": str(e.edit_version)}
        return Response(data, media_type="application/octet-stream", headers=headers)
    body = SessionEdit(
        session_id=e.session_id,
        model_version=e.model_version,
        prototype_id=e.prototype_id,
        edit_version=e.edit_version,
        layers=[EditLayer(weight=w.tolist(), bias=b.tolist()) for w, b in zip(e.weight, e.bias, strict=True)],
        code=e.code.tolist(),
        item_bias=None if e.item_bias is None else e.item_bias.tolist(),
        binary_bytes=binary_sizes(e, r),
    )
    return Response(body.model_dump_json(), media_type="application/json")
