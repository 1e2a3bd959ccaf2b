"""Checks on KServe v2 inference requests before Triton parses them.

Triton 2.51's HTTP front end parses JSON recursively (a body nested 50,000 deep overflows its stack
and kills the server) and answers several malformed requests with 500. Every request the front
passes on has been parsed here by a parser that cannot overflow (orjson stops at depth 1024) and
matches the v2 schema: known fields, flat parameters, shapes of non-negative integers, and data whose
element count and types agree with the shape, in JSON or in the binary tensor extension. The same
element rules apply to gRPC requests, parsed from protobuf. The count of BYTES elements is the
request's cost for admission."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from math import prod

import orjson

MAX_INPUTS = 16
MAX_RANK = 8
MAX_DIM = 2**31 - 1
MAX_PARAMETERS = 32

_FIXED_SIZES = {
    "BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2,
    "INT32": 4, "UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8,
}  # fmt: skip
DATATYPES = frozenset(_FIXED_SIZES) | {"BYTES"}
_REQUEST_FIELDS = frozenset({"id", "parameters", "inputs", "outputs"})
_INPUT_FIELDS = frozenset({"name", "datatype", "shape", "parameters", "data"})
_OUTPUT_FIELDS = frozenset({"name", "parameters"})
# Shared memory is closed at the front (any client could name another process's file), so a request
# that points a tensor at a region is refused here with a clear message instead of failing later.
_SHM_PARAMETERS = frozenset({"shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"})
_LENGTH_PREFIX = struct.Struct("<I")


class BadRequest(Exception):
    """A request the front refuses itself: HTTP `status`, gRPC INVALID_ARGUMENT (or the mapped code)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TensorHeader:
    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def elements(self) -> int:
        return prod(self.shape)


def infer_cost(tensors: Iterable[TensorHeader]) -> int:
    """How many texts a request asks the encoders for: its BYTES elements, at least 1."""
    return max(1, sum(tensor.elements for tensor in tensors if tensor.datatype == "BYTES"))


def check_header(name: object, datatype: object, shape: object) -> TensorHeader:
    if not isinstance(name, str) or not name or len(name) > 256:
        raise BadRequest("input 'name' must be a non-empty string")
    if datatype not in DATATYPES:
        raise BadRequest(f"{name}: unknown datatype {datatype!r}; expected one of {', '.join(sorted(DATATYPES))}")
    if not isinstance(shape, Sequence) or isinstance(shape, str | bytes) or len(shape) > MAX_RANK:
        raise BadRequest(f"{name}: 'shape' must be a list of at most {MAX_RANK} integers")
    for dim in shape:
        # bool is an int in Python; JSON true is no dimension.
        if type(dim) is not int or not 0 <= dim <= MAX_DIM:
            raise BadRequest(f"{name}: shape {list(shape)} must hold integers from 0 to {MAX_DIM}, got {dim!r}")
    return TensorHeader(name, datatype, tuple(shape))


def check_element_count(tensor: TensorHeader, count: int) -> None:
    if count != tensor.elements:
        raise BadRequest(
            f"{tensor.name}: shape {list(tensor.shape)} holds {tensor.elements} elements but the data has {count}"
        )


def bytes_elements(buffer: bytes | memoryview, name: str) -> int:
    """Elements in a BYTES tensor's raw form: each is a 4-byte little-endian length, then that many bytes."""
    view, offset, count = memoryview(buffer), 0, 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise BadRequest(f"{name}: BYTES data ends inside an element's 4-byte length")
        (length,) = _LENGTH_PREFIX.unpack_from(view, offset)
        offset += 4 + length
        if offset > len(view):
            raise BadRequest(f"{name}: a BYTES element of {length} bytes runs past the end of the data")
        count += 1
    return count


def check_raw(tensor: TensorHeader, buffer: bytes | memoryview) -> None:
    if tensor.datatype == "BYTES":
        check_element_count(tensor, bytes_elements(buffer, tensor.name))
        return
    expected = tensor.elements * _FIXED_SIZES[tensor.datatype]
    if len(buffer) != expected:
        raise BadRequest(
            f"{tensor.name}: {tensor.datatype} shape {list(tensor.shape)} needs {expected} bytes, got {len(buffer)}"
        )


def _element_ok(datatype: str, value: object) -> bool:
    if datatype == "BYTES":
        return isinstance(value, str)
    if datatype == "BOOL":
        return isinstance(value, bool)
    if datatype.startswith(("INT", "UINT")):
        return type(value) is int
    return type(value) in (int, float)


def _json_elements(tensor: TensorHeader, data: object) -> int:
    """Count the elements of `data`, flat or nested along the shape, checking each one's type."""
    if not isinstance(data, list):
        raise BadRequest(f"{tensor.name}: 'data' must be a list")
    level, depth = data, 1
    # Nested data follows the shape, one list per dimension; flat data is one list. Nothing deeper.
    while level and isinstance(level[0], list):
        if not all(isinstance(sub, list) for sub in level):
            raise BadRequest(f"{tensor.name}: 'data' mixes lists and values at one level")
        depth += 1
        if depth > max(len(tensor.shape), 1):
            raise BadRequest(f"{tensor.name}: 'data' is nested deeper than its shape {list(tensor.shape)}")
        level = [item for sub in level for item in sub]
    for value in level:
        if not _element_ok(tensor.datatype, value):
            raise BadRequest(f"{tensor.name}: {tensor.datatype} data holds {_kind(value)}")
    return len(level)


def _kind(value: object) -> str:
    return "a list" if isinstance(value, list) else f"{type(value).__name__} {orjson.dumps(value)[:40].decode()}"


def _check_fields(what: str, item: object, allowed: frozenset[str]) -> dict:
    if not isinstance(item, dict):
        raise BadRequest(f"{what} must be a JSON object")
    unknown = item.keys() - allowed
    if unknown:
        raise BadRequest(f"{what}: unknown field {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(allowed))}")
    return item


def check_parameters(what: str, parameters: object) -> dict:
    """KServe parameters are a flat object of strings, numbers and booleans."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict) or len(parameters) > MAX_PARAMETERS:
        raise BadRequest(f"{what}: 'parameters' must be an object of at most {MAX_PARAMETERS} entries")
    for key, value in parameters.items():
        if not isinstance(value, str | int | float | bool):
            raise BadRequest(f"{what}: parameter {key!r} must be a string, number or boolean")
    shm = _SHM_PARAMETERS & parameters.keys()
    if shm:
        raise BadRequest(f"{what}: {sorted(shm)[0]} refused: shared memory is closed on this server; send the data")
    return parameters


@dataclass(frozen=True)
class CheckedRequest:
    tensors: tuple[TensorHeader, ...]

    @property
    def cost(self) -> int:
        return infer_cost(self.tensors)


def header_length(value: str | None, body_length: int) -> int | None:
    """The JSON part's length from `Inference-Header-Content-Length` (binary extension), or None."""
    if value is None:
        return None
    if not value.isdigit() or int(value) > body_length:
        raise BadRequest(
            f"Inference-Header-Content-Length {value[:32]!r} must be an integer "
            f"from 0 to the body's {body_length} bytes"
        )
    return int(value)


def check_http_infer(body: bytes, inference_header_length: str | None) -> CheckedRequest:
    """Parse and check a KServe v2 JSON inference request, with or without binary tensor data."""
    json_length = header_length(inference_header_length, len(body))
    head = body if json_length is None else body[:json_length]
    try:
        request = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    request = _check_fields("request", request, _REQUEST_FIELDS)
    if "id" in request and not isinstance(request["id"], str):
        raise BadRequest("request 'id' must be a string")
    check_parameters("request", request.get("parameters"))
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= MAX_INPUTS:
        raise BadRequest(f"'inputs' must be a list of 1 to {MAX_INPUTS} tensors")
    outputs = request.get("outputs", [])
    if not isinstance(outputs, list) or len(outputs) > MAX_INPUTS:
        raise BadRequest(f"'outputs' must be a list of at most {MAX_INPUTS} tensors")
    for output in outputs:
        output = _check_fields("output", output, _OUTPUT_FIELDS)
        if not isinstance(output.get("name"), str):
            raise BadRequest("output 'name' must be a string")
        check_parameters(output["name"], output.get("parameters"))
    binary = memoryview(body)[len(head) :]
    tensors, offset = [], 0
    for item in inputs:
        item = _check_fields("input", item, _INPUT_FIELDS)
        tensor = check_header(item.get("name"), item.get("datatype"), item.get("shape"))
        size = check_parameters(tensor.name, item.get("parameters")).get("binary_data_size")
        if size is None:
            if "data" not in item:
                raise BadRequest(f"{tensor.name}: no 'data' and no binary_data_size parameter")
            check_element_count(tensor, _json_elements(tensor, item["data"]))
        else:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise BadRequest(f"{tensor.name}: binary_data_size {size!r} runs past the body's binary part")
            if "data" in item:
                raise BadRequest(f"{tensor.name}: both 'data' and binary_data_size given")
            check_raw(tensor, binary[offset : offset + size])
            offset += size
        tensors.append(tensor)
    if offset != len(binary):
        raise BadRequest(f"the body has {len(binary) - offset} bytes after the tensors' binary data")
    return CheckedRequest(tuple(tensors))


def check_json_document(body: bytes, max_depth: int = 16) -> None:
    """Other JSON bodies Triton parses (model load with a config): well-formed and shallow."""
    if not body:
        return
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise BadRequest(f"JSON nested deeper than {max_depth} levels")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
