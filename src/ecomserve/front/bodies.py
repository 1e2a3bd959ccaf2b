"""Reading a request body within the front's limits: its size (declared, received and decompressed)
and the request timeout, so a slow or oversized upload costs the front nothing it did not allow."""

from __future__ import annotations

import asyncio
import zlib

from starlette.requests import Request

from ecomserve.front.kserve import BadRequest

_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The body, decompressed if gzip/deflate; 413 past `max_bytes` (before it is read whole), 408 when it
    does not arrive within `timeout_s`."""
    try:
        body = await asyncio.wait_for(_receive(request, max_bytes), timeout_s)
    except TimeoutError:
        raise BadRequest(f"request not received within {timeout_s:.0f} s", status=408) from None
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding == "identity":
        return body
    if encoding not in _DECODERS:
        raise BadRequest(f"Content-Encoding {encoding!r} not supported; use gzip, deflate or none", status=415)
    decoder = zlib.decompressobj(_DECODERS[encoding])
    try:
        plain = decoder.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise BadRequest(f"body is not valid {encoding}: {exc}") from None
    if len(plain) > max_bytes or decoder.unconsumed_tail:
        raise _too_large(f"over {max_bytes} once decompressed,", max_bytes)
    return plain


async def _receive(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise _too_large(declared, max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(f"over {size}", max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: str, max_bytes: int) -> BadRequest:
    return BadRequest(
        f"request body of {size} bytes exceeds the limit of {max_bytes} (serving.front.max_body_bytes)", status=413
    )
