"""The front's JSON responses: one encoder (orjson, numpy arrays included) and Retry-After on overload."""

from __future__ import annotations

import orjson
from starlette.responses import Response

from ecomserve.front.admission import RETRY_AFTER_S


def json_response(content: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """`content` as JSON; 429 and 503 carry Retry-After."""
    if status in (429, 503):
        headers = {**(headers or {}), "retry-after": str(RETRY_AFTER_S)}
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status, headers=headers, media_type="application/json")


def error_response(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    """KServe's error shape, for what the front refuses itself on Triton's ports."""
    return json_response({"error": message}, status, headers)
