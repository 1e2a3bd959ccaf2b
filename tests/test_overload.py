"""Bounded queues: an overloaded server refuses quickly with UNAVAILABLE / 503 instead of letting
latency grow without bound, and the requests it accepts still get correct answers."""

from __future__ import annotations

import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import psutil
import pytest
import requests
from raw_protocol import Tensor, infer
from support import make_tiny_bert, spec_from, start_server, wait_for

pytestmark = pytest.mark.integration

TEXTS = [f"stainless steel insulated water bottle {i} " * 6 for i in range(8)]


@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("overload")
    source = make_tiny_bert(root / "tiny", seed=5)
    spec = spec_from(
        {
            "encoders": [{"name": "tiny", "source": str(source), "max_seq_len": 128}],
            "serving": {
                "instances": 1,
                "dynamic_batching": {"max_batch_size": 8, "preferred_batch_size": [8], "max_queue_delay_us": 0},
                "queue": {"max_queue_size": 2, "timeout_us": 0},
                "response_cache": False,
            },
        }
    )
    server = start_server(spec, root)
    yield server
    server.stop()


def _timed(call):
    start = time.perf_counter()
    answer = call()
    return answer, time.perf_counter() - start


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_flood_is_refused_fast_and_accepted_requests_are_right(small_queue_server, protocol):
    request = [Tensor("TEXT", "BYTES", [8, 1], [t.encode() for t in TEXTS])]
    expected = infer(protocol, small_queue_server, "embed", request).outputs["EMBEDDING"]
    with ThreadPoolExecutor(48) as pool:
        results = list(
            pool.map(lambda _: _timed(lambda: infer(protocol, small_queue_server, "embed", request)), range(96))
        )
    refused = [(a, t) for a, t in results if not a.ok]
    accepted = [a for a, _ in results if a.ok]
    assert refused, "48 concurrent clients never filled a queue of 2"
    assert accepted
    for answer, seconds in refused:
        assert answer.status == ("503" if protocol == "http" else "UNAVAILABLE"), answer.message
        assert "queue" in answer.message.lower()
        assert seconds < 2.0
    for answer in accepted:
        assert np.abs(answer.outputs["EMBEDDING"] - expected).max() <= 1e-5
    assert small_queue_server.is_ready()


def test_rank_passes_overload_on_as_unavailable(small_queue_server):
    """rank calls embed; a refusal there reaches the client as UNAVAILABLE, not as an internal error."""
    request = [
        Tensor("QUERY", "BYTES", [1], [b"bottle"]),
        Tensor("CANDIDATES", "BYTES", [64], [t.encode() for t in TEXTS * 8]),
    ]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda _: infer("grpc", small_queue_server, "rank", request), range(64)))
    statuses = {a.status for a in answers}
    assert statuses <= {"OK", "UNAVAILABLE"}, statuses
    assert "UNAVAILABLE" in statuses


# --- admission and connection limits at the front ------------------------------------------------------------

FRONT = {"max_texts_in_flight": 64, "max_texts_waiting": 128, "max_wait_s": 0.5, "max_connections": 64,
         "idle_timeout_s": 2.0}  # fmt: skip
CLIENTS = 200


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    """Small front limits: 64 texts in flight, a line of 128 for 0.5 s at most, 64 connections per protocol, 2 s idle
    timeout."""
    root = tmp_path_factory.mktemp("guarded")
    source = make_tiny_bert(root / "tiny", seed=6)
    spec = spec_from(
        {"encoders": [{"name": "tiny", "source": str(source), "max_seq_len": 32}], "serving": {"front": FRONT}}
    )
    server = start_server(spec, root)
    yield server
    server.stop()


def _inputs(model: str, n: int) -> list[Tensor]:
    """A request of many texts never sent before: rank and classify 101 texts, embed 32."""
    texts = [f"{model} item {n} {i} {uuid.uuid4().hex[:6]}".encode() for i in range(101)]
    if model == "embed":
        return [Tensor("TEXT", "BYTES", [32, 1], texts[:32])]
    first, rest = ("QUERY", "CANDIDATES") if model == "rank" else ("TEXT", "LABELS")
    return [Tensor(first, "BYTES", [1], texts[:1]), Tensor(rest, "BYTES", [100], texts[1:])]


def _http_call(server, model: str, tensors: list[Tensor]) -> tuple[int, dict, float]:
    header = {"inputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape,
                          "data": [v.decode() for v in t.values]} for t in tensors]}  # fmt: skip
    start = time.perf_counter()
    response = requests.post(f"http://{server.http_url}/v2/models/{model}/infer", json=header, timeout=120)
    return response.status_code, dict(response.headers), time.perf_counter() - start


@pytest.mark.parametrize("model", ["embed", "rank", "classify"])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_200_clients_get_fast_refusals_and_bounded_correct_answers(guarded_server, model, protocol):
    requests_ = [_inputs(model, n) for n in range(CLIENTS)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda t: _timed(lambda: infer(protocol, guarded_server, model, t)), requests_))
    refused = [(answer, seconds) for answer, seconds in results if not answer.ok]
    accepted = [(tensors, answer, seconds) for tensors, (answer, seconds) in zip(requests_, results) if answer.ok]
    assert refused and accepted, f"{len(refused)} refused, {len(accepted)} accepted"
    for answer, seconds in refused:
        assert answer.status == ("503" if protocol == "http" else "UNAVAILABLE"), answer.message
        assert "server busy" in answer.message and "max_texts_in_flight" in answer.message
        assert seconds < 2.0
    latencies = sorted(seconds for _, _, seconds in accepted)
    assert latencies[int(0.99 * (len(latencies) - 1))] < 10.0
    # What was accepted under load is what the same texts get alone. The list input goes reversed: the same
    # request again would be answered by embed's response cache (for rank and classify, by the cache of the
    # embed calls they make), proving nothing; reversed, every text is computed again in other batches.
    for tensors, answer, _ in accepted[:5]:
        *fixed, varied = tensors
        alone = infer(protocol, guarded_server, model, [*fixed, replace(varied, values=varied.values[::-1])])
        for name, value in answer.outputs.items():
            again = alone.outputs[name]
            if name != "LABEL":  # every other output follows the list input's order, along its last axis
                again = np.flip(again, axis=0 if name == "EMBEDDING" else -1)
            if value.dtype.kind in "OUS":
                assert (value == again).all()
            else:
                assert np.abs(value - again).max() <= 1e-5
    assert guarded_server.is_ready()


def test_http_refusals_carry_retry_after(guarded_server):
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda n: _http_call(guarded_server, "rank", _inputs("rank", n)), range(64)))
    refused = [headers for status, headers, _ in results if status == 503]
    assert refused and all(headers.get("retry-after") == "1" for headers in refused)


def _held(port: int, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        try:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    return held


def _closed_by_server(connection: socket.socket) -> bool:
    """Read until the server closes (gRPC greets first with its HTTP/2 settings)."""
    connection.settimeout(10)
    try:
        while connection.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _served(protocol: str, server, request: list[Tensor]) -> bool:
    try:
        return infer(protocol, server, "embed", request).ok
    except requests.ConnectionError:  # closed at once: the connection cap is reached
        return False


def test_held_idle_connections_are_capped_and_closed(guarded_server):
    """Idle connections that never send a byte (20,100 of them exhausted Triton's descriptors and flooded
    its log): the front closes those past max_connections at once and the rest after the idle timeout."""
    front = psutil.Process(guarded_server.front_pid)
    fds_before = front.num_fds()
    http_port, grpc_port = guarded_server.options.ports.http, guarded_server.options.ports.grpc
    held = _held(http_port, 400) + _held(grpc_port, 400)
    try:
        time.sleep(0.5)
        assert front.num_fds() <= fds_before + 2 * FRONT["max_connections"] + 16
        # Once the idle ones time out, clients are served again.
        request = [Tensor("TEXT", "BYTES", [1, 1], [f"fresh {uuid.uuid4().hex}".encode()])]
        for protocol in ("http", "grpc"):
            assert wait_for(lambda p=protocol: _served(p, guarded_server, request), timeout_s=15), (
                f"{protocol} never served while connections were held"
            )
        assert all(_closed_by_server(connection) for connection in held)
    finally:
        for connection in held:
            connection.close()
    assert guarded_server.front_log_path.stat().st_size < 1_000_000
    assert guarded_server.is_ready()
