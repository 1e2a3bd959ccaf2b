"""The front's gRPC side: Triton's GRPCInferenceService passed through as raw messages.

Each call is classified by method (policy.py) and checked for the keys it needs (`authorization` metadata
for the API key, UNAUTHENTICATED without it); inference requests are parsed from protobuf for the
same element checks and admission as HTTP, then the original bytes go to Triton's private socket
with the caller's metadata (less both keys) and deadline. Triton's status codes come back unchanged."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from ecomserve.contract import ADMIN_HEADER, API_KEY_HEADER
from ecomserve.front.admission import Admission
from ecomserve.front.kserve import (
    MAX_INPUTS,
    BadRequest,
    CheckedRequest,
    check_element_count,
    check_header,
    check_parameters,
    check_raw,
)
from ecomserve.front.policy import GRPC_ACCESS, Access, Keys, closed_message, unauthorized_message

# tritonclient sends restricted-protocol headers with Triton's prefix; ecomserve's client sends the plain name.
_ADMIN_METADATA = (ADMIN_HEADER, f"triton-grpc-protocol-{ADMIN_HEADER}")
_SECRET_METADATA = (*_ADMIN_METADATA, API_KEY_HEADER)
_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 413: grpc.StatusCode.RESOURCE_EXHAUSTED}


def _parameter_values(parameters) -> dict:
    return {key: parameter.WhichOneof("parameter_choice") for key, parameter in parameters.items()}


def check_grpc_infer(raw: bytes) -> CheckedRequest:
    """A ModelInfer request's checked tensors."""
    try:
        request = service_pb2.ModelInferRequest.FromString(raw)
    except DecodeError as exc:
        raise BadRequest(f"malformed ModelInferRequest: {exc}") from None
    check_parameters("request", _parameter_values(request.parameters))
    if not 1 <= len(request.inputs) <= MAX_INPUTS:
        raise BadRequest(f"'inputs' must hold 1 to {MAX_INPUTS} tensors")
    for output in request.outputs:
        check_parameters(output.name, _parameter_values(output.parameters))
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(request.inputs):
        raise BadRequest(f"{len(raw_contents)} raw_input_contents for {len(request.inputs)} inputs")
    tensors = []
    for index, item in enumerate(request.inputs):
        tensor = check_header(item.name, item.datatype, list(item.shape))
        check_parameters(tensor.name, _parameter_values(item.parameters))
        if raw_contents:
            check_raw(tensor, raw_contents[index])
        else:
            contents = item.contents
            count = sum(len(getattr(contents, field.name)) for field in contents.DESCRIPTOR.fields)
            check_element_count(tensor, count)
        tensors.append(tensor)
    return CheckedRequest(tuple(tensors))


class GrpcProxy(grpc.GenericRpcHandler):
    def __init__(self, upstream: grpc.aio.Channel, admission: Admission, keys: Keys, timeout_s: float):
        self._upstream = upstream
        self._timeout_s = timeout_s
        self._admission = admission
        self._keys = keys
        # gRPC asks service() on every call: each known method's handler is built once, here.
        self._handlers = {method: self._handler(method, access) for method, access in GRPC_ACCESS.items()}

    def service(self, details: grpc.HandlerCallDetails):
        return self._handlers.get(details.method)  # None: gRPC answers UNIMPLEMENTED

    def _handler(self, method: str, access: Access):
        if access is Access.CLOSED and method.endswith("StreamInfer"):
            return grpc.stream_stream_rpc_method_handler(self._refuse_stream)
        forward = self._upstream.unary_unary(method)

        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await self._call(access, method, forward, request, context)

        return grpc.unary_unary_rpc_method_handler(call)

    async def _refuse_stream(self, requests, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, closed_message("ModelStreamInfer"))
        yield b""  # an async generator, as stream handlers must be

    async def _call(self, access: Access, method: str, forward, request: bytes, context) -> bytes:
        metadata = tuple(context.invocation_metadata() or ())
        if access is Access.CLOSED:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, closed_message(method.rsplit("/", 1)[-1]))
        admin_given = next((value for key, value in metadata if key in _ADMIN_METADATA), None)
        if not self._keys.admits(access, next((v for k, v in metadata if k == API_KEY_HEADER), None), admin_given):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, unauthorized_message() + " metadata")
        if access is Access.ADMIN:
            if not self._keys.is_admin(admin_given):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, f"{method} needs the admin key in the {ADMIN_HEADER} metadata"
                )
        # Neither key goes on to Triton (its logs would hold them).
        forwarded = tuple((key, value) for key, value in metadata if key not in _SECRET_METADATA)
        try:
            if access is Access.INFER:
                async with self._admission.admit(check_grpc_infer(request).cost):
                    return await self._forward(forward, request, forwarded, context)
            return await self._forward(forward, request, forwarded, context)
        except BadRequest as refused:
            code = _STATUS.get(refused.status, grpc.StatusCode.UNAVAILABLE)
            await context.abort(code, str(refused))

    async def _forward(self, forward, request: bytes, metadata, context) -> bytes:
        try:
            remaining = context.time_remaining()
            timeout = self._timeout_s if remaining is None else min(remaining, self._timeout_s)
            return await forward(request, metadata=metadata, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if exc.code() == grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
                details = "tritonserver is not reachable (starting or restarting); retry shortly"
            await context.abort(exc.code(), details)
