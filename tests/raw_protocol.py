"""Requests built by hand, below any ecomserve code: KServe v2 over raw HTTP, and plain tritonclient gRPC.

Bad-input tests use these so that the server, not a client library, is what enforces the rules."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # KServe v2 name: BYTES, INT32, FP32 …
    shape: list[int]
    values: list  # bytes for BYTES, numbers otherwise


@dataclass(frozen=True)
class Answer:
    ok: bool
    status: str  # HTTP status code as text, or the gRPC status name
    message: str
    outputs: dict[str, np.ndarray]


def _serialize_bytes(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def http_infer(url: str, model: str, tensors: list[Tensor], version: str = "") -> Answer:
    """BYTES tensors go as binary data (so invalid UTF-8 can be sent); others as JSON."""
    header_inputs, blobs = [], []
    for t in tensors:
        entry = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.datatype == "BYTES":
            blob = _serialize_bytes(t.values)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = t.values
        header_inputs.append(entry)
    header = json.dumps({"inputs": header_inputs}).encode()
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    response = requests.post(
        f"http://{url}{path}",
        data=header + b"".join(blobs),
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
        timeout=60,
    )
    body = response.json()
    if response.status_code != 200:
        return Answer(False, str(response.status_code), body.get("error", ""), {})
    outputs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in body["outputs"]}
    return Answer(True, "200", "", outputs)


def grpc_infer(url: str, model: str, tensors: list[Tensor], version: str = "") -> Answer:
    client = grpcclient.InferenceServerClient(url)
    try:
        inputs = []
        for t in tensors:
            tensor = grpcclient.InferInput(t.name, t.shape, t.datatype)
            dtype = np.object_ if t.datatype == "BYTES" else {"INT32": np.int32, "FP32": np.float32}[t.datatype]
            tensor.set_data_from_numpy(np.array(t.values, dtype=dtype).reshape(t.shape))
            inputs.append(tensor)
        try:
            result = client.infer(model, inputs, model_version=version, client_timeout=60)
        except InferenceServerException as exc:
            return Answer(False, str(exc.status()).removeprefix("StatusCode."), exc.message(), {})
        outputs = {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}
        return Answer(True, "OK", "", outputs)
    finally:
        client.close()


def infer(protocol: str, server, model: str, tensors: list[Tensor], version: str = "") -> Answer:
    if protocol == "http":
        return http_infer(server.http_url, model, tensors, version)
    return grpc_infer(server.grpc_url, model, tensors, version)
