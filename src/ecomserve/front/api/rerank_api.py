"""Cohere's rerank API, `POST /v1/rerank` and `/v2/rerank` (Jina's `/v1/rerank` reads the same), and
TEI's `POST /rerank`, all answered by the `rank` model (a bi-encoder: cosine similarities).

Cohere documents `relevance_score` in [0, 1], so the cosine c is reported as (c + 1) / 2, which keeps
the order; TEI's `raw_scores: true` gives c itself."""

from __future__ import annotations

import uuid

import numpy as np

from ecomserve.front.api.context import ApiContext
from ecomserve.front.api.schemas import RerankRequest, TeiRerankRequest, parse


def _order(scores: np.ndarray, top_n: int | None) -> list[int]:
    """Best first; equal scores keep the input order (as `rank`'s consumers sort)."""
    return [int(i) for i in np.argsort(-scores, kind="stable")[:top_n]]


def _relevance(cosine: float) -> float:
    return (cosine + 1.0) / 2.0


async def _rank(ctx: ApiContext, query: str, documents: list[str], truncate: bool = True, left: bool = False):
    # Checked and counted here; the rank model adds the query and passage prompts itself.
    tokens = ctx.rules.prepare([query], "query", truncate=truncate, left=left).tokens
    prepared = ctx.rules.prepare(documents, "documents", truncate=truncate, left=left)
    scores = await ctx.models.rank(query, prepared.texts if left else documents)
    return scores, tokens + prepared.tokens


async def _cohere(ctx: ApiContext, body: bytes, version: str) -> dict:
    request = parse(RerankRequest, body)
    ctx.check_model(request.model)
    documents = [d if isinstance(d, str) else d.text for d in request.documents]
    scores, tokens = await _rank(ctx, request.query, documents)
    results = []
    for index in _order(scores, request.top_n):
        result: dict = {"index": index, "relevance_score": _relevance(float(scores[index]))}
        if request.return_documents:
            result["document"] = {"text": documents[index]}
        results.append(result)
    return {
        "id": str(uuid.uuid4()),
        "results": results,
        "meta": {"api_version": {"version": version}, "billed_units": {"search_units": 1}},
        "model": ctx.model_id,
        "usage": {"total_tokens": tokens},
    }


async def cohere_v1(ctx: ApiContext, body: bytes) -> dict:
    return await _cohere(ctx, body, "1")


async def cohere_v2(ctx: ApiContext, body: bytes) -> dict:
    return await _cohere(ctx, body, "2")


async def tei(ctx: ApiContext, body: bytes) -> list:
    request = parse(TeiRerankRequest, body)
    left = request.truncation_direction == "left"
    scores, _ = await _rank(ctx, request.query, request.texts, request.truncate is not False, left)
    answer = []
    for index in _order(scores, None):
        cosine = float(scores[index])
        result: dict = {"index": index, "score": cosine if request.raw_scores else _relevance(cosine)}
        if request.return_text:
            result["text"] = request.texts[index]
        answer.append(result)
    return answer
