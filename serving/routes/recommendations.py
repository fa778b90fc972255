"""Ranking routes: by stored session (GET), by session and/or carried history (POST), and in batches."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel

from serving.deps import Context
from serving.problems import problem_responses
from serving.ranking import RankQuery, RankResult
from serving.schemas import (
    DEFAULT_K,
    FIELDS_DOC,
    MAX_ID_LEN,
    MAX_K,
    BatchRequest,
    BatchResponse,
    RankedItem,
    RecommendationRequest,
    Recommendations,
    parse_fields,
)

router = APIRouter(tags=["recommendations"])

SessionPath = Annotated[str, Path(min_length=1, max_length=MAX_ID_LEN, description="The session id.")]


def shape(result: RankResult) -> Recommendations:
    return Recommendations(
        session_id=result.session_id,
        items=[
            RankedItem(item_id=i, score=s, rank=n, **details)
            for n, ((i, s), details) in enumerate(zip(result.items, result.details, strict=True), start=1)
        ],
        model_version=result.model_version,
        prototype_id=result.prototype_id,
        edit_version=result.edit_version,
        fallback=result.fallback,  # type: ignore[arg-type]
        known_session=result.known_session,
        unknown_items_ignored=result.unknown_items_ignored,
        unknown_candidates=result.unknown_candidates,
    )


def as_json(model: BaseModel) -> Response:
    """The model serialized once, by pydantic's own serializer.

    Returning the model would make FastAPI validate it again against ``response_model`` and then serialize it;
    the routes build it from typed values already. ``response_model`` stays on the routes for the OpenAPI.
    """
    return Response(model.model_dump_json(), media_type="application/json")


def _query(body: RecommendationRequest) -> RankQuery:
    fields = tuple(dict.fromkeys(body.fields))
    return RankQuery(body.session_id, body.recent_items, body.candidates, body.k, body.exclude_seen, fields)


@router.get(
    "/v1/sessions/{session_id}/recommendations",
    response_model=Recommendations,
    summary="Rank items for a stored session",
    description=(
        "Ranks with the session's stored edit (read fresh: an event accepted just before is reflected). "
        "An unknown session is a cold start, not an error: 200 with the popularity ranking, "
        '`fallback: "popularity"` and `known_session: false`.'
    ),
    responses=problem_responses(401, 403, 422, 503),
)
async def session_recommendations(
    session_id: SessionPath,
    ctx: Context,
    k: Annotated[int, Query(ge=1, le=MAX_K, description="How many items to return.")] = DEFAULT_K,
    exclude_seen: Annotated[
        bool | None,
        Query(description="Leave out the session's history (default: yes, unless the model recommends items again)."),
    ] = None,
    fields: Annotated[
        str | None, Query(max_length=1024, description=FIELDS_DOC + " Comma separated.", examples=["year,genres"])
    ] = None,
) -> Response:
    query = RankQuery(session_id=session_id, k=k, exclude_seen=exclude_seen, fields=parse_fields(fields))
    result = await ctx.batcher.rank(query)
    return as_json(shape(result))


@router.post(
    "/v1/recommendations",
    response_model=Recommendations,
    summary="Rank for a session, a carried history, or both",
    description=(
        "`session_id` alone ranks with the stored state; `recent_items` alone is stateless (the adapter runs "
        "in the request); both append the carried items to the stored history. Unknown items are ignored and "
        "listed; `candidates` restricts the ranking."
    ),
    responses=problem_responses(401, 403, 413, 422, 503),
)
async def recommendations(body: RecommendationRequest, ctx: Context) -> Response:
    result = await ctx.batcher.rank(_query(body))
    return as_json(shape(result))


@router.post(
    "/v1/recommendations:batch",
    response_model=BatchResponse,
    summary="Rank up to 256 requests in one batched forward",
    responses=problem_responses(401, 403, 413, 422, 503),
)
def batch_recommendations(body: BatchRequest, ctx: Context) -> Response:
    results = ctx.ranker.rank([_query(r) for r in body.requests], batch=True)
    return as_json(BatchResponse(results=[shape(r) for r in results]))


router.add_api_route(
    "/v1/recommendations/batch",
    batch_recommendations,
    methods=["POST"],
    response_model=BatchResponse,
    include_in_schema=False,  # alias for clients whose HTTP stack dislikes ':' in paths
)
