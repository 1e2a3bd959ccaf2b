"""The front's HTTP side: KServe v2 passed through to Triton's private socket after the checks.

A request goes: route policy (health, open, inference, admin, closed) → the API key (all but health;
401) and the admin key (admin) → body read within `max_body_bytes` and the request timeout
(decompressed if gzip/deflate, within the same limit) → for inference, the KServe checks and admission →
Triton over its unix socket → the answer as Triton gave it (503s gain `Retry-After`). Errors the front gives
itself are KServe's `{"error": …}`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiohttp
from starlette.requests import Request
from starlette.responses import Response

from ecomserve.contract import ADMIN_HEADER, API_KEY_HEADER
from ecomserve.front.admission import RETRY_AFTER_S, Admission
from ecomserve.front.bodies import read_body
from ecomserve.front.kserve import BadRequest, check_http_infer, check_json_document
from ecomserve.front.policy import Access, Keys, closed_message, http_access, unauthorized_message
from ecomserve.front.responses import error_response

_FORWARDED_REQUEST_HEADERS = ("content-type", "inference-header-content-length", "accept-encoding")
_FORWARDED_RESPONSE_HEADERS = ("content-type", "inference-header-content-length", "content-encoding")
log = logging.getLogger("ecomserve.front")


@dataclass
class HttpFront:
    upstream_socket: str
    admission: Admission
    keys: Keys
    max_body_bytes: int
    request_timeout_s: float

    async def open(self) -> None:
        connector = aiohttp.UnixConnector(path=self.upstream_socket, limit=256)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=self.request_timeout_s),
        )

    async def close(self) -> None:
        await self._session.close()

    async def handle(self, request: Request) -> Response:
        path = request.url.path
        access, _ = http_access(request.method, path)
        try:
            if access is Access.UNKNOWN:
                raise BadRequest(f"no such endpoint: {request.method} {path}", status=404)
            if access is Access.CLOSED:
                raise BadRequest(closed_message(path), status=403)
            admin_header = request.headers.get(ADMIN_HEADER)
            if not self.keys.admits(access, request.headers.get(API_KEY_HEADER), admin_header):
                return error_response(unauthorized_message(), 401, {"www-authenticate": "Bearer"})
            if access is Access.ADMIN and not self.keys.is_admin(admin_header):
                raise BadRequest(f"{path} needs the admin key in the {ADMIN_HEADER} header", status=403)
            body = await read_body(request, self.max_body_bytes, self.request_timeout_s)
            if access is Access.INFER:
                checked = check_http_infer(body, request.headers.get("inference-header-content-length"))
                async with self.admission.admit(checked.cost):
                    return await self._forward(request, body)
            if access is Access.ADMIN:
                check_json_document(body)
            return await self._forward(request, body)
        except BadRequest as refused:
            return error_response(str(refused), refused.status)

    async def _forward(self, request: Request, body: bytes) -> Response:
        headers = {name: request.headers[name] for name in _FORWARDED_REQUEST_HEADERS if name in request.headers}
        url = f"http://triton{request.url.path}"
        try:
            async with self._session.request(request.method, url, data=body or None, headers=headers) as upstream:
                content = await upstream.read()
                status = upstream.status
                answer = {k: upstream.headers[k] for k in _FORWARDED_RESPONSE_HEADERS if k in upstream.headers}
        except aiohttp.ClientConnectionError:
            return error_response("tritonserver is not reachable (starting or restarting); retry shortly", 503)
        except TimeoutError:
            return error_response(f"tritonserver did not answer within {self.request_timeout_s:.0f} s", 504)
        if status == 503:
            answer["retry-after"] = str(RETRY_AFTER_S)
        return Response(content, status, headers=answer)
