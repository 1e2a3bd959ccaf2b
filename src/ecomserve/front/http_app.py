"""The front's HTTP side: KServe v2 passed through to Triton's private socket after the checks.

A request goes: route policy (open, inference, admin with key, closed) → body read within
`max_body_bytes` and the request timeout (decompressed if gzip/deflate, within the same limit) →
for inference, the KServe checks and admission → Triton over its unix socket → the answer as
Triton gave it (503s gain `Retry-After`). Errors the front gives itself are KServe's `{"error": …}`."""

from __future__ import annotations

import asyncio
import logging
import zlib
from dataclasses import dataclass

import aiohttp
import orjson
from starlette.requests import Request
from starlette.responses import Response

from ecomserve.contract import ADMIN_HEADER
from ecomserve.front.admission import RETRY_AFTER_S, Admission
from ecomserve.front.kserve import BadRequest, check_http_infer, check_json_document
from ecomserve.front.metrics_app import MetricsFront
from ecomserve.front.policy import Access, closed_message, http_access, key_matches

_FORWARDED_REQUEST_HEADERS = ("content-type", "inference-header-content-length", "accept-encoding")
_FORWARDED_RESPONSE_HEADERS = ("content-type", "inference-header-content-length", "content-encoding")
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
log = logging.getLogger("ecomserve.front")


@dataclass
class HttpFront:
    upstream_socket: str
    admission: Admission
    admin_key: str | None
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
            if access is Access.ADMIN and not key_matches(request.headers.get(ADMIN_HEADER), self.admin_key):
                raise BadRequest(f"{path} needs the admin key in the {ADMIN_HEADER} header", status=403)
            body = await asyncio.wait_for(self._read_body(request), self.request_timeout_s)
            if access is Access.INFER:
                checked = check_http_infer(body, request.headers.get("inference-header-content-length"))
                with self.admission.admit(checked.cost):
                    return await self._forward(request, body)
            if access is Access.ADMIN:
                check_json_document(body)
            return await self._forward(request, body)
        except BadRequest as refused:
            return error_response(str(refused), refused.status)
        except TimeoutError:
            return error_response(f"request not received within {self.request_timeout_s:.0f} s", 408)

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            raise self._too_large(declared)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large(f"over {size}")
            chunks.append(chunk)
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding == "identity":
            return body
        if encoding not in _DECODERS:
            raise BadRequest(f"Content-Encoding {encoding!r} not supported; use gzip, deflate or none", status=415)
        decoder = zlib.decompressobj(_DECODERS[encoding])
        try:
            plain = decoder.decompress(body, self.max_body_bytes + 1)
        except zlib.error as exc:
            raise BadRequest(f"body is not valid {encoding}: {exc}") from None
        if len(plain) > self.max_body_bytes or decoder.unconsumed_tail:
            raise self._too_large(f"over {self.max_body_bytes} once decompressed,")
        return plain

    def _too_large(self, size: str) -> BadRequest:
        return BadRequest(
            f"request body of {size} bytes exceeds the limit of {self.max_body_bytes} (serving.front.max_body_bytes)",
            status=413,
        )

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


def error_response(message: str, status: int) -> Response:
    headers = {"retry-after": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return Response(orjson.dumps({"error": message}), status, headers=headers, media_type="application/json")


class FrontApp:
    """The ASGI app of the HTTP and the metrics port (one uvicorn server, one signal handler): a request
    is routed by the port it came in on. KServe passthrough is the hot path, so it runs as a plain ASGI
    handler with Starlette's Request and Response but without its router and middleware stack."""

    def __init__(self, front: HttpFront, metrics: MetricsFront, metrics_port: int):
        self.front, self.metrics, self.metrics_port = front, metrics, metrics_port

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await self._dispatch(request)
        except Exception:  # a bug must cost one request a 500, never the connection or the process
            log.exception("request %s %s failed in the front", request.method, request.url.path)
            response = error_response("internal error in the front; see its log", 500)
        await response(scope, receive, send)

    async def _dispatch(self, request: Request) -> Response:
        if request.scope["server"][1] != self.metrics_port:
            return await self.front.handle(request)
        if request.url.path == "/metrics" and request.method in ("GET", "HEAD"):
            return await self.metrics.handle(request)
        return error_response("the metrics port serves GET /metrics only", 404)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.front.open()
                await self.metrics.open()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.metrics.close()
                await self.front.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
