"""Device routes: the model version's device graph and its manifest, downloaded once per version (ETag)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Response

from serving.deps import Context
from serving.device import etag_matches
from serving.problems import problem_responses

router = APIRouter(tags=["devices"])

VersionPath = Annotated[str, Path(min_length=1, max_length=64, description="The model version (edits name theirs).")]
IfNoneMatch = Annotated[str | None, Header(description="The ETag of the copy the device has: 304 when current.")]

#: A version's artifact never changes (the version names the bundle's content), so caches may keep it.
CACHE_CONTROL = "public, max-age=86400, immutable"


def _cached(data: bytes, etag: str, media_type: str, if_none_match: str | None, version: str) -> Response:
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL, "X-Persona-Model-Version": version}
    if etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)


@router.get(
    "/v1/models/{version}/device",
    summary="The device model of a version (ONNX)",
    description=(
        "The ONNX graph a device runs (docs/device.md): inputs `history`, `seen`, `delta_weight`, `delta_bias`, "
        "`item_bias`; outputs `scores`, `top_indices`, `top_scores`. Sent with a strong `ETag`: a device that "
        "sends it back in `If-None-Match` gets 304 and keeps its copy. 404 unless `version` is the served one."
    ),
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The ONNX model"},
        304: {"description": "The device's copy (If-None-Match) is current"},
        **problem_responses(401, 403, 404, 422, 503),
    },
)
def device_model(version: VersionPath, ctx: Context, if_none_match: IfNoneMatch = None) -> Response:
    a = ctx.devices.artifact(ctx.models.get(), version)
    return _cached(a.graph, a.graph_etag, "application/octet-stream", if_none_match, a.version)


@router.get(
    "/v1/models/{version}/device/manifest",
    summary="The device model's manifest: vocabulary and shapes",
    description=(
        "JSON beside the graph: `items` (vocabulary: index i + 2 is `items[i]`; 0 = padding, 1 = unknown), "
        "`max_len` and `window_stride` (which of the session's items the `history` input holds), `n_edit_layers`, "
        "`dim`, `k`. With `ETag` / `If-None-Match` like the graph."
    ),
    response_class=Response,
    responses={
        200: {"content": {"application/json": {}}, "description": "The device manifest"},
        304: {"description": "The device's copy (If-None-Match) is current"},
        **problem_responses(401, 403, 404, 422, 503),
    },
)
def device_manifest(version: VersionPath, ctx: Context, if_none_match: IfNoneMatch = None) -> Response:
    a = ctx.devices.artifact(ctx.models.get(), version)
    return _cached(a.manifest, a.manifest_etag, "application/json", if_none_match, a.version)
