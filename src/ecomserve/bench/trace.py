"""Triton's own trace of single queries sent straight to one model: where a request's time goes inside tritonserver
(its gRPC front end, the queue, the backend's execute, the response) and, by difference, in the client and the
socket. Used by `ecomserve bench --workload latency` on the spec's server, over Triton's private socket only.

Tracing is set up when the server starts (`trace_args`: Triton takes the trace file only on its command line), off;
`traced` turns TIMESTAMPS on for one model while its requests run; Triton writes the file when it stops."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# span → (Triton timestamp it starts at, the one it ends at), in a request's order (Triton 2.51's names).
SPANS = {
    "grpc_in": ("GRPC_WAITREAD_END", "QUEUE_START"),
    "queue": ("QUEUE_START", "COMPUTE_START"),
    "input": ("COMPUTE_START", "COMPUTE_INPUT_END"),
    "execute": ("COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START"),
    "output": ("COMPUTE_OUTPUT_START", "INFER_RESPONSE_COMPLETE"),
    "grpc_out": ("INFER_RESPONSE_COMPLETE", "GRPC_SEND_END"),
}
IN_SERVER = ("GRPC_WAITREAD_END", "GRPC_SEND_END")


def trace_args(path: Path) -> list[str]:
    """tritonserver flags for a trace file at `path`, tracing off until `traced` turns it on."""
    return [f"--trace-config=triton,file={path}", "--trace-config=level=OFF", "--trace-config=rate=1"]


@contextmanager
def traced(url: str, model: str) -> Iterator[None]:
    """Every request to `model` traced with timestamps inside the block (`url`: Triton's gRPC address)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        client.update_trace_settings(model, {"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
        try:
            yield
        finally:
            client.update_trace_settings(model, {"trace_level": ["OFF"]})
    finally:
        client.close()


def request_timestamps(path: Path) -> list[dict[str, int]]:
    """Each traced request's timestamps (name → ns) from Triton's trace file, in trace order."""
    by_id: dict[int, dict[str, int]] = {}
    for entry in json.loads(path.read_text()):
        for stamp in entry.get("timestamps", ()):
            by_id.setdefault(entry["id"], {})[stamp["name"]] = int(stamp["ns"])
    return [stamps for _, stamps in sorted(by_id.items()) if all(name in stamps for name in IN_SERVER)]


def _median_ms(requests: list[dict[str, int]], start: str, end: str) -> float:
    return statistics.median(r[end] - r[start] for r in requests) / 1e6


def breakdown(path: Path, client_p50_ms: float) -> dict[str, float]:
    """Median milliseconds of each span over the traced requests, the whole time inside tritonserver, and what the
    client measured beyond it (`client_p50_ms` of the same requests: tritonclient, the socket, the wake-ups)."""
    requests = request_timestamps(path) if path.exists() else []
    if not requests:
        return {}
    in_server = _median_ms(requests, *IN_SERVER)
    return {f"{span}_ms": _median_ms(requests, *ends) for span, ends in SPANS.items()} | {
        "requests": len(requests),
        "in_server_ms": in_server,
        "client_ms": client_p50_ms,
        "client_and_socket_ms": client_p50_ms - in_server,
    }
