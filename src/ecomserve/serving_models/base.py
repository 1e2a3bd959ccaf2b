"""What every ecomserve python-backend model shares: the config, tensors, per-request errors.
Each model reads its parameters with its dataclass in ecomserve.parameters."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ecomserve.errors import InvalidInput

log = logging.getLogger("ecomserve")


def model_config(args: dict) -> dict:
    return json.loads(args["model_config"])


def version_dir(args: dict) -> Path:
    return Path(args["model_repository"]) / args["model_version"]


def input_array(request, name: str) -> np.ndarray:
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy()


def output(name: str, array: np.ndarray):
    return pb_utils.Tensor(name, array)


def bytes_array(values: list[str]) -> np.ndarray:
    return np.array([value.encode("utf-8") for value in values], dtype=np.object_)


# Triton's own words when a bounded queue refuses a request (queue full, or waited too long).
_OVERLOAD = re.compile(r"Exceeds maximum queue size|Request timeout expired")


# The python backend checks a BLS target's readiness before each call. When a publish or rollback
# moves `embed`, the version Triton picks as the latest can start unloading between that pick and the
# check: the call fails at once, while the next try reaches the version taking over.
_SWITCHING_VERSION = re.compile(r"Model '[^']+' is not ready\.")
BLS_ATTEMPTS, BLS_BACKOFF_S = 5, 0.02


async def exec_bls(make_request):
    """Run a BLS request (built anew for each try) through a version switch: a `not ready` answer is
    retried a few times, 20 ms apart and growing; any other answer, or the last try's, is returned."""
    for attempt in range(1, BLS_ATTEMPTS):
        response = await make_request().async_exec()
        if not (response.has_error() and _SWITCHING_VERSION.search(response.error().message())):
            return response
        await asyncio.sleep(BLS_BACKOFF_S * attempt)
    return await make_request().async_exec()


class UpstreamError(Exception):
    """A model called through BLS answered with an error; passed on with its code, so an overloaded
    `embed` reaches the client as UNAVAILABLE. The 2.51 python backend hands BLS errors back as
    INTERNAL whatever their cause, so a queue refusal is recognised by Triton's message."""

    def __init__(self, error):
        super().__init__(error.message())
        code = error.code()
        if code == pb_utils.TritonError.INTERNAL and _OVERLOAD.search(error.message()):
            code = pb_utils.TritonError.UNAVAILABLE
        self.error = pb_utils.TritonError(error.message(), code)


class Unavailable(Exception):
    """What the request needs is not there yet (an index, a loaded release): UNAVAILABLE, with the fix."""


def error_response(exc: Exception):
    """Bad input → INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT); an upstream error keeps its code;
    Unavailable → UNAVAILABLE (503); anything else → INTERNAL, logged."""
    if isinstance(exc, UpstreamError):
        return pb_utils.InferenceResponse(error=exc.error)
    if isinstance(exc, Unavailable):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.UNAVAILABLE))
    if isinstance(exc, InvalidInput):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
    log.exception("request failed")
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {exc}"))


async def respond_each_async(requests, handle):
    """respond_each for coroutine handlers (models that await BLS calls)."""
    responses = []
    for request in requests:
        try:
            responses.append(await handle(request))
        except Exception as exc:  # noqa: BLE001 - every failure becomes that request's error response
            responses.append(error_response(exc))
    return responses


def respond_each(requests, handle):
    """One response per request, in order; an error fails its own request and no other."""
    responses = []
    for request in requests:
        try:
            responses.append(handle(request))
        except Exception as exc:  # noqa: BLE001 - every failure becomes that request's error response
            responses.append(error_response(exc))
    return responses
