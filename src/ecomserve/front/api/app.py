"""The API port: a request goes route → API key → body (within the front's size and time limits) →
the endpoint (schemas.py, then texts.py's rules, then triton.py) → JSON, or an error in the endpoint's
dialect. KServe v2 paths (/v2/…) on this port go to the KServe passthrough, with its own checks."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from ecomserve.contract import ADMIN_HEADER, API_KEY_HEADER
from ecomserve.front.admission import Admission
from ecomserve.front.api import openai_api, rerank_api, tei_api
from ecomserve.front.api.context import ApiContext
from ecomserve.front.api.errors import ApiError, Dialect, Reason
from ecomserve.front.api.texts import TextRules
from ecomserve.front.api.triton import TritonModels
from ecomserve.front.bodies import read_body
from ecomserve.front.http_app import HttpFront
from ecomserve.front.kserve import BadRequest
from ecomserve.front.policy import Access, Keys, unauthorized_message
from ecomserve.front.responses import json_response
from ecomserve.spec import PipelineSpec

Handler = Callable[[ApiContext, bytes], Awaitable[object]]

ROUTES: dict[str, tuple[str, Handler, Dialect]] = {
    "/v1/embeddings": ("POST", openai_api.embeddings, Dialect.OPENAI),
    "/v1/models": ("GET", openai_api.models, Dialect.OPENAI),
    "/v1/search": ("POST", openai_api.search, Dialect.OPENAI),
    "/v1/similar": ("POST", openai_api.similar, Dialect.OPENAI),
    "/v1/classify": ("POST", openai_api.classify, Dialect.OPENAI),
    "/v1/rerank": ("POST", rerank_api.cohere_v1, Dialect.COHERE),
    "/v2/rerank": ("POST", rerank_api.cohere_v2, Dialect.COHERE),
    "/embed": ("POST", tei_api.embed, Dialect.TEI),
    "/rerank": ("POST", rerank_api.tei, Dialect.TEI),
    "/tokenize": ("POST", tei_api.tokenize, Dialect.TEI),
    "/info": ("GET", tei_api.info, Dialect.TEI),
    "/health": ("GET", tei_api.health, Dialect.TEI),
}
# Probes carry no key.
_OPEN_PATHS = frozenset({"/health"})
# The front's own refusals (body limits; admission's Overloaded is a 503) as API reasons.
_BAD_REQUEST_REASONS = {413: Reason.BODY_TOO_LARGE, 408: Reason.TIMEOUT, 503: Reason.OVERLOADED}


class ApiSide:
    def __init__(self, spec: PipelineSpec, tokenizer_files: list[Path], grpc_target: str, admission: Admission,
                 keys: Keys, kserve: HttpFront):  # fmt: skip
        limits = spec.serving.front
        models = TritonModels(
            grpc_target, admission, limits.request_timeout_s, spec.serving.dynamic_batching.max_batch_size
        )
        self.context = ApiContext(spec, models, TextRules.for_pipeline(spec, tokenizer_files))
        self._keys, self._kserve = keys, kserve
        self._max_body_bytes, self._timeout_s = limits.max_body_bytes, limits.request_timeout_s

    async def open(self) -> None:
        await self.context.models.open()

    async def close(self) -> None:
        await self.context.models.close()

    async def handle(self, request: Request) -> Response:
        path = request.url.path
        route = ROUTES.get(path)
        if route is None and path.startswith("/v2/"):
            return await self._kserve.handle(request)
        started = time.perf_counter()
        dialect = route[2] if route else Dialect.OPENAI
        try:
            answer = await self._answer(request, route)
            response = Response(status_code=200) if answer is None else json_response(answer)
        except ApiError as error:
            response = dialect.render(error)
        except BadRequest as refused:
            reason = _BAD_REQUEST_REASONS.get(refused.status, Reason.INVALID)
            response = dialect.render(ApiError(reason, str(refused)))
        self.context.counters.record(path if route else "other", response.status_code, time.perf_counter() - started)
        return response

    async def _answer(self, request: Request, route: tuple[str, Handler, Dialect] | None) -> object:
        path, method = request.url.path, "GET" if request.method == "HEAD" else request.method
        if route is None:
            raise ApiError(Reason.NOT_FOUND, f"no such endpoint: {request.method} {path}; see GET /v1/models, /info")
        wanted, handler, _ = route
        if method != wanted:
            raise ApiError(Reason.METHOD, f"{path} takes {wanted}, not {request.method}")
        if path not in _OPEN_PATHS and not self._keys.admits(
            Access.OPEN, request.headers.get(API_KEY_HEADER), request.headers.get(ADMIN_HEADER)
        ):
            raise ApiError(Reason.UNAUTHORIZED, unauthorized_message())
        body = await read_body(request, self._max_body_bytes, self._timeout_s) if method == "POST" else b""
        return await handler(self.context, body)
