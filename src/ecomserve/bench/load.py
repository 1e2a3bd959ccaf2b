"""Closed-loop load: N workers each send the next request as soon as the last one answered.

Every contender — PyTorch, the in-process runtime, the served pipeline — is measured through
`measure`, on the same texts, so the numbers are ratios of like with like."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Measurement:
    contender: str
    workload: str
    protocol: str  # "in-process", "grpc" or "http"
    concurrency: int
    requests: int
    items_per_request: int
    seconds: float
    throughput_rps: float  # requests per second
    throughput_items: float  # texts per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int

    def row(self) -> dict:
        return asdict(self)


# Contenders compared in turns take this many rounds each, the order reversed every round: this machine's speed
# drifts by up to 1.6x within minutes, so points taken minutes apart compare the minutes as much as the contenders.
ROUNDS = 4


def in_turns(names: list[str]) -> Iterator[str]:
    """`names` ROUNDS times, the order reversed every round: a b, b a, a b, b a."""
    for round_ in range(ROUNDS):
        yield from names if round_ % 2 == 0 else names[::-1]


def merged(points: list[Measurement]) -> Measurement:
    """One measurement of several taken in turns: requests, time and errors add up; each percentile is the
    median of the turns' (a turn in a slow minute moves it less than pooling the samples would)."""
    requests, seconds = sum(p.requests for p in points), sum(p.seconds for p in points)
    return replace(
        points[0],
        requests=requests,
        seconds=seconds,
        throughput_rps=requests / seconds,
        throughput_items=requests * points[0].items_per_request / seconds,
        p50_ms=statistics.median(p.p50_ms for p in points),
        p95_ms=statistics.median(p.p95_ms for p in points),
        p99_ms=statistics.median(p.p99_ms for p in points),
        errors=sum(p.errors for p in points),
    )


def take_turns(turns: dict[str, Callable[[], list[Measurement]]]) -> list[Measurement]:
    """Each contender's turn (a call that measures its points once) in ROUNDS rounds, the order reversed each
    round; the rounds' measurements of each point merged into one, in the order first measured."""
    taken: dict[tuple, list[Measurement]] = {}
    for name in in_turns(list(turns)):
        for point in turns[name]():
            taken.setdefault((point.contender, point.workload, point.protocol, point.concurrency), []).append(point)
    return [merged(points) for points in taken.values()]


def measure(
    contender: str,
    workload: str,
    protocol: str,
    concurrency: int,
    make_call: Callable[[int], Callable[[int], object]],
    items_per_request: int,
    duration_s: float,
    warmup_requests: int = 3,
    before_each: Callable[[], None] | None = None,
) -> Measurement:
    """`make_call(worker)` returns that worker's call(i) (own connection); i indexes the shared texts. Each worker
    calls `before_each()` (untimed) before each call."""
    calls = [make_call(w) for w in range(concurrency)]
    for i in range(warmup_requests):
        calls[0](i)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    deadline = time.perf_counter() + duration_s
    counter = iter(range(10**9))
    lock = threading.Lock()

    def worker(w: int) -> None:
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter)
            if before_each is not None:
                before_each()
            start = time.perf_counter()
            try:
                calls[w](i)
            except Exception:  # noqa: BLE001 - counted, reported, never hidden
                errors[w] += 1
                continue
            latencies[w].append(time.perf_counter() - start)

    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    done = np.array([x for worker_latencies in latencies for x in worker_latencies]) * 1000
    count = len(done)
    p50, p95, p99 = np.percentile(done, [50, 95, 99]) if count else (float("nan"),) * 3
    return Measurement(
        contender,
        workload,
        protocol,
        concurrency,
        count,
        items_per_request,
        seconds,
        count / seconds,
        count * items_per_request / seconds,
        float(p50),
        float(p95),
        float(p99),
        sum(errors),
    )


def grpc_embed(url: str, model: str) -> Callable[[list[str]], object]:
    """One tritonclient gRPC connection's call: texts → `model`'s answer (TEXT as BYTES [n, 1])."""
    import tritonclient.grpc as grpcclient

    from ecomserve.contract import TEXT

    client = grpcclient.InferenceServerClient(url)

    def call(texts: list[str]) -> object:
        tensor = grpcclient.InferInput(TEXT, [len(texts), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
        return client.infer(model, [tensor])

    return call
