"""Requests to ecomserve's HTTP API (`ecomserve serve --api-port`, default 8080): a workload Call as OpenAI's
POST /v1/embeddings, Cohere's POST /v1/rerank or ecomserve's POST /v1/search and /v1/similar, with the check its
answer must pass, and how a refusal is reported.

The API users send the texts the Triton users send, drawn by workload.Workload: embed's calls become
/v1/embeddings (a single query as a plain string, titles as a list), rank's become /v1/rerank (the query, the
candidates as documents, top_n all of them), search's /v1/search (query, top_k, filter, mode) and similar's
/v1/similar (ids, top_k, filter). classify has no endpoint. Plain Python, no Locust."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from answers import check_api_embeddings, check_api_hits, check_api_rerank

EMBEDDINGS_PATH = "/v1/embeddings"
RERANK_PATH = "/v1/rerank"
MODELS_PATH = "/v1/models"
SEARCH_PATH = "/v1/search"
SIMILAR_PATH = "/v1/similar"
# The key is read from the environment only: a command-line value would show in `ps` and in shell history.
API_KEY_ENV = "ECOMSERVE_API_KEY"
ENCODING_FORMATS = ("float", "base64")
# Workload scenarios with an endpoint.
API_SCENARIOS = ("search", "query_embedding", "recommendation", "catalog_search", "similar")


@dataclass(frozen=True)
class ApiRequest:
    name: str  # stable request name without the protocol, the Call's: "embed query"
    path: str
    body: dict
    check: Callable[[object], None]  # takes the parsed JSON answer, raises answers.WrongAnswer


def embeddings_body(texts: Sequence[str], model: str, encoding_format: str = "float") -> dict:
    """OpenAI's embeddings request: one text as a plain string (as most clients send a query), more as a list."""
    if not texts:
        raise ValueError("an embeddings request needs at least one text")
    if encoding_format not in ENCODING_FORMATS:
        raise ValueError(f"encoding_format {encoding_format!r}: expected one of {', '.join(ENCODING_FORMATS)}")
    return {"input": texts[0] if len(texts) == 1 else list(texts), "model": model, "encoding_format": encoding_format}


def rerank_body(query: str, documents: Sequence[str], model: str, top_n: int, return_documents: bool = False) -> dict:
    """Cohere's rerank request."""
    if not documents or top_n < 1:
        raise ValueError(f"a rerank request needs documents and top_n >= 1, got {len(documents)} and {top_n}")
    return {
        "model": model,
        "query": query,
        "documents": list(documents),
        "top_n": top_n,
        "return_documents": return_documents,
    }


def catalog_body(call, model: str) -> dict:
    """/v1/search's or /v1/similar's body for a workload.Call to search or similar: its tensors as fields (FILTER's
    JSON text as the object it is)."""
    inputs = {tensor.name: tensor.values for tensor in call.inputs}
    body = {"model": model}
    if call.model == "search":
        (body["query"],) = inputs["QUERY"]
    else:
        body["ids"] = list(inputs["ITEM_IDS"])
    if "TOP_K" in inputs:
        (body["top_k"],) = inputs["TOP_K"]
    if "FILTER" in inputs:
        body["filter"] = json.loads(inputs["FILTER"][0])
    if "MODE" in inputs:
        (body["mode"],) = inputs["MODE"]
    return body


def from_call(call, model: str, encoding_format: str = "float") -> ApiRequest:
    """The API request for a workload.Call to embed, rank, search or similar."""
    if call.model in ("search", "similar"):
        path = SEARCH_PATH if call.model == "search" else SIMILAR_PATH
        return ApiRequest(call.name, path, catalog_body(call, model), partial(check_api_hits, hits=call.hits))
    inputs = {tensor.name: tensor.values for tensor in call.inputs}
    if call.model == "embed":
        texts = inputs["TEXT"]
        check = partial(check_api_embeddings, texts=len(texts), encoding_format=encoding_format)
        return ApiRequest(call.name, EMBEDDINGS_PATH, embeddings_body(texts, model, encoding_format), check)
    if call.model == "rank":
        (query,) = inputs["QUERY"]
        documents = inputs["CANDIDATES"]
        top_n = len(documents)  # every document scored, as rank scores every candidate
        check = partial(check_api_rerank, documents=documents, top_n=top_n)
        return ApiRequest(call.name, RERANK_PATH, rerank_body(query, documents, model, top_n), check)
    raise ValueError(
        f"{call.name!r}: the API has no endpoint for model {call.model!r} (it serves embed, rank, search and similar)"
    )


def auth_headers(environ: Mapping[str, str]) -> dict[str, str]:
    """`Authorization: Bearer <key>` when $ECOMSERVE_API_KEY is set, else no header (a server without a key)."""
    key = environ.get(API_KEY_ENV, "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


def error_text(text: str | None) -> str:
    """The message of an error answer: OpenAI's {"error": {"message": …}}, Cohere's {"message": …}, KServe's
    {"error": "…"}, Starlette's {"detail": …}, or the start of the body."""
    try:
        body = json.loads(text or "")
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        for value in (error, body.get("message"), body.get("detail")):
            if isinstance(value, str):
                return value
    return (text or "")[:200]


def failure_message(status: int, error: str, retry_after: str | None, key_sent: bool) -> str:
    """A refused request as Locust's failures table shows it: the cause first, worded the same every time so that
    equal refusals group (429 overload apart from other errors, like UNAVAILABLE for gRPC). Never the key."""
    if status == 429:
        wait = f"Retry-After: {retry_after}" if retry_after else "no Retry-After header"
        return f"HTTP 429 overloaded ({wait}): {error}"
    if status in (401, 403):
        hint = f"check ${API_KEY_ENV}" if key_sent else f"${API_KEY_ENV} is not set"
        return f"HTTP {status} not authorized ({hint}): {error}"
    return f"HTTP {status}: {error}"
