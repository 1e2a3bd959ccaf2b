"""OpenAI's embeddings API (`POST /v1/embeddings`, `GET /v1/models`) and ecomserve's own JSON endpoints
(`POST /v1/search`, `POST /v1/similar`, `POST /v1/classify`), which share its error shape."""

from __future__ import annotations

from ecomserve.front.api.context import ApiContext
from ecomserve.front.api.schemas import (
    ClassifyRequest,
    EmbeddingsRequest,
    SearchRequest,
    SimilarRequest,
    as_list,
    parse,
)
from ecomserve.front.api.texts import as_base64, shorten
from ecomserve.front.api.triton import Found


async def embeddings(ctx: ApiContext, body: bytes) -> dict:
    request = parse(EmbeddingsRequest, body)
    ctx.check_model(request.model)
    await ctx.check_dimensions(request.dimensions)
    prepared = ctx.rules.prepare(
        as_list(request.input),
        "input",
        kind=request.input_type,
        truncate=request.truncate not in (False, "NONE"),
        left=request.truncate == "START",
    )
    vectors = shorten(await ctx.models.embed(prepared.texts), request.dimensions)
    if request.encoding_format == "base64":
        encoded = [as_base64(vector) for vector in vectors]
    else:
        encoded = list(vectors)  # numpy rows; orjson writes them as float lists
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(encoded)],
        "model": ctx.model_id,
        "usage": {"prompt_tokens": prepared.tokens, "total_tokens": prepared.tokens},
    }


async def models(ctx: ApiContext, _: bytes) -> dict:
    return {
        "object": "list",
        "data": [{"id": ctx.model_id, "object": "model", "created": ctx.created, "owned_by": "ecomserve"}],
    }


async def search(ctx: ApiContext, body: bytes) -> dict:
    request = parse(SearchRequest, body)
    ctx.check_model(request.model)
    # The search model adds the query prompt itself.
    ctx.rules.prepare([request.query], "query")
    return _found(ctx, await ctx.models.search(request.query, request.top_k, request.filter, request.mode))


async def similar(ctx: ApiContext, body: bytes) -> dict:
    """Items similar to `ids`, never one of them; the `similar` model checks the ids (count, length, known)."""
    request = parse(SimilarRequest, body)
    ctx.check_model(request.model)
    return _found(ctx, await ctx.models.similar(request.ids, request.top_k, request.filter, request.diversity))


def _found(ctx: ApiContext, found: Found) -> dict:
    results = [
        {"id": item, "score": float(score), "title": title}
        for item, score, title in zip(found.ids, found.scores, found.titles, strict=True)
    ]
    return {"object": "list", "model": ctx.model_id, "results": results}


async def classify(ctx: ApiContext, body: bytes) -> dict:
    request = parse(ClassifyRequest, body)
    ctx.check_model(request.model)
    ctx.rules.prepare([request.text], "text")
    ctx.rules.prepare(request.labels, "labels")
    answer = await ctx.models.classify(request.text, request.labels)
    scores = [
        {"index": i, "label": label, "score": float(score), "votes": int(votes)}
        for i, (label, score, votes) in enumerate(zip(request.labels, answer.scores, answer.votes, strict=True))
    ]
    return {"object": "classification", "model": ctx.model_id, "label": answer.label, "scores": scores}
