"""Hugging Face Text Embeddings Inference's API: `POST /embed`, `POST /tokenize`, `GET /info`,
`GET /health` (its `/rerank` is in rerank_api.py)."""

from __future__ import annotations

from ecomserve import __version__
from ecomserve.front.api.context import ApiContext
from ecomserve.front.api.errors import ApiError, Reason
from ecomserve.front.api.schemas import TeiEmbedRequest, TeiTokenizeRequest, as_list, parse
from ecomserve.front.api.texts import shorten


async def embed(ctx: ApiContext, body: bytes):
    request = parse(TeiEmbedRequest, body)
    if not request.normalize:
        raise ApiError(
            Reason.INVALID,
            "normalize: false is not available: this server's models normalise inside the graph",
            "normalize",
        )
    await ctx.check_dimensions(request.dimensions)
    prepared = ctx.rules.prepare(
        as_list(request.inputs),
        "inputs",
        kind=ctx.rules.prompt_kind(request.prompt_name, "prompt_name"),
        truncate=request.truncate is not False,
        left=request.truncation_direction == "left",
    )
    return shorten(await ctx.models.embed(prepared.texts), request.dimensions)


async def tokenize(ctx: ApiContext, body: bytes) -> list:
    request = parse(TeiTokenizeRequest, body)
    kind = ctx.rules.prompt_kind(request.prompt_name, "prompt_name")
    return ctx.rules.tokenize(as_list(request.inputs), kind, request.add_special_tokens)


async def info(ctx: ApiContext, _: bytes) -> dict:
    return {
        "model_id": ctx.model_id,
        "model_sha": None,
        "model_dtype": ctx.spec.encoders[0].precision,
        "model_type": {"embedding": {"pooling": ctx.spec.encoders[0].pooling}},
        "max_concurrent_requests": ctx.spec.serving.front.max_texts_in_flight,
        "max_input_length": ctx.rules.max_seq_len,
        "max_batch_tokens": ctx.rules.max_seq_len * ctx.rules.max_inputs,
        "max_batch_requests": None,
        "max_client_batch_size": ctx.rules.max_inputs,
        "auto_truncate": True,
        "tokenization_workers": 1,
        "prompts": ctx.rules.prompts or None,
        "version": __version__,
        "router": "ecomserve",
    }


async def health(ctx: ApiContext, _: bytes) -> None:
    if not await ctx.models.ready():
        raise ApiError(Reason.UNAVAILABLE, "the models are not ready (starting, restarting or loading)")
