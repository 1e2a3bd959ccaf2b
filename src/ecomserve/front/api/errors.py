"""API errors, and each peer's error shape.

A handler raises ApiError with a `reason`; the dialect of the endpoint decides the status and the body,
so one rule (an empty text, a text over the token limit) reads as each peer's own clients expect it:
OpenAI `{"error": {"message", "type", "param", "code"}}`, TEI `{"error", "error_type"}` (with TEI's
status codes: schema errors 422, limits 413), Cohere `{"message"}`."""

from __future__ import annotations

from enum import Enum

from starlette.responses import Response

from ecomserve.front.responses import json_response


class Reason(Enum):
    INVALID = "invalid"  # the body does not match the schema, or a value is out of range
    EMPTY = "empty"  # an empty or whitespace-only text
    TOO_LONG = "too_long"  # over the model's token limit with truncation off
    TOO_MANY = "too_many"  # more inputs than the limit
    BODY_TOO_LARGE = "body_too_large"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"  # an unknown model, endpoint, or a search without an index
    METHOD = "method"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"  # Triton starting, restarting or not ready
    TIMEOUT = "timeout"
    BACKEND = "backend"  # Triton failed a request it accepted


_STATUS = {
    Reason.INVALID: 400, Reason.EMPTY: 400, Reason.TOO_LONG: 400, Reason.TOO_MANY: 400, Reason.BODY_TOO_LARGE: 413,
    Reason.UNAUTHORIZED: 401, Reason.NOT_FOUND: 404, Reason.METHOD: 405, Reason.OVERLOADED: 429,
    Reason.UNAVAILABLE: 503, Reason.TIMEOUT: 504, Reason.BACKEND: 500,
}  # fmt: skip
_TEI_STATUS = {Reason.INVALID: 422, Reason.TOO_LONG: 413, Reason.TOO_MANY: 413, Reason.BACKEND: 424}
_TEI_TYPE = {
    Reason.EMPTY: "Empty", Reason.OVERLOADED: "Overloaded", Reason.UNAVAILABLE: "Unhealthy",
    Reason.BACKEND: "Backend", Reason.TIMEOUT: "Backend", Reason.UNAUTHORIZED: "Unauthorized",
}  # fmt: skip
_OPENAI_TYPE = {
    Reason.UNAUTHORIZED: "invalid_request_error", Reason.OVERLOADED: "rate_limit_error",
    Reason.UNAVAILABLE: "server_error", Reason.TIMEOUT: "server_error", Reason.BACKEND: "server_error",
}  # fmt: skip
_OPENAI_CODE = {
    Reason.UNAUTHORIZED: "invalid_api_key", Reason.OVERLOADED: "rate_limit_exceeded",
    Reason.TOO_LONG: "context_length_exceeded", Reason.NOT_FOUND: "not_found",
}  # fmt: skip


class ApiError(Exception):
    def __init__(self, reason: Reason, message: str, param: str | None = None):
        super().__init__(message)
        self.reason, self.message, self.param = reason, message, param


class Dialect(Enum):
    OPENAI = "openai"  # also ecomserve's own endpoints
    TEI = "tei"
    COHERE = "cohere"

    def render(self, error: ApiError) -> Response:
        status = _STATUS[error.reason]
        headers = {"www-authenticate": "Bearer"} if error.reason is Reason.UNAUTHORIZED else None
        if self is Dialect.TEI:
            status = _TEI_STATUS.get(error.reason, status)
            body: dict = {"error": error.message, "error_type": _TEI_TYPE.get(error.reason, "Validation")}
        elif self is Dialect.COHERE:
            body = {"message": error.message}
        else:
            code = "model_not_found" if error.param == "model" else _OPENAI_CODE.get(error.reason)
            kind = _OPENAI_TYPE.get(error.reason, "invalid_request_error")
            body = {"error": {"message": error.message, "type": kind, "param": error.param, "code": code}}
        return json_response(body, status, headers)
