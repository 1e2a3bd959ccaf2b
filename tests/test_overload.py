"""Bounded queues: an overloaded server refuses quickly with UNAVAILABLE / 503 instead of letting
latency grow without bound, and the requests it accepts still get correct answers."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from raw_protocol import Tensor, infer
from support import make_tiny_bert, spec_from, start_server

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
