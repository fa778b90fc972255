"""Session routes: the stored state summary and the edit a device applies locally."""

from __future__ import annotations

from fastapi import APIRouter

from serving.deps import Context
from serving.problems import problem_responses
from serving.routes.recommendations import SessionPath
from serving.schemas import EditLayer, SessionEdit, SessionSummary

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
    )


@router.get(
    "/v1/sessions/{session_id}/edit",
    response_model=SessionEdit,
    summary="The session's edit, for on-device inference",
    description=(
        "ΔW (D×D) and Δb (D) per editable layer, exactly what the server adds when it ranks this session: "
        "a device holding model `model_version` applies `W_l + ΔW_l`, `b_l + Δb_l` and ranks locally. "
        "404 for an unknown session; 409 while the session has no item the model knows."
    ),
    responses=problem_responses(401, 403, 404, 409, 422, 503),
)
def session_edit(session_id: SessionPath, ctx: Context) -> SessionEdit:
    e = ctx.ranker.session_edit(session_id)
    return SessionEdit(
        session_id=e.session_id,
        model_version=e.model_version,
        prototype_id=e.prototype_id,
        edit_version=e.edit_version,
        layers=[EditLayer(weight=w.tolist(), bias=b.tolist()) for w, b in zip(e.weight, e.bias, strict=True)],
        code=e.code.tolist(),
    )
