"""`ecomserve bench --workload latency` without a server: each setting's spec, the fresh texts, and the split of
Triton's statistics into mean milliseconds per request."""

from __future__ import annotations

import os
from pathlib import Path
from typing import get_args

import pytest
from support import make_tiny_bert, spec_from, start_server

from ecomserve.bench import trace as triton_trace
from ecomserve.bench.latency import (
    BATCH,
    IDLE_BETWEEN_MS,
    PAUSES,
    SETTINGS,
    SIDE_BY_SIDE,
    FreshTexts,
    latency_markdown,
    phase_breakdown,
    setting_spec,
    summary,
)
from ecomserve.bench.load import Measurement, grpc_embed, measure, merged
from ecomserve.contract import EMBEDDER
from ecomserve.server.process import SCHEDULING_POLICIES, scheduling_policy
from ecomserve.spec import ServingSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]


def test_each_setting_changes_only_its_serving_fields_and_turns_the_cache_off():
    spec = load_spec(ROOT / "export/default.yaml")
    assert set(SETTINGS) >= {"spec", "500 us batching delay", "two threads when idle", "normal scheduling, no pinning"}
    for change in SETTINGS.values():
        changed = setting_spec(spec, change)
        assert changed.serving.response_cache is False
        assert changed.encoders == spec.encoders and changed.search == spec.search
        delay = change.get("max_queue_delay_us", spec.serving.dynamic_batching.max_queue_delay_us)
        assert changed.serving.dynamic_batching.max_queue_delay_us == delay
        assert changed.serving.idle_threads == change.get("idle_threads", spec.serving.idle_threads)
        assert changed.serving.instances == spec.serving.instances


def test_fresh_texts_never_repeat():
    texts = FreshTexts()
    sent = [texts.query(i) for i in range(1000)] + [t for i in range(20) for t in texts.titles(i)]
    assert len(set(sent)) == len(sent) == 1000 + 20 * BATCH


def test_phase_breakdown_is_the_mean_per_request_between_two_readings():
    before = {"count": 10, "success": 50_000_000, "queue": 5_000_000, "compute_input": 1_000_000}
    before |= {"compute_infer": 40_000_000, "compute_output": 1_000_000}
    after = {"count": 14, "success": 70_000_000, "queue": 6_000_000, "compute_input": 1_400_000}
    after |= {"compute_infer": 58_000_000, "compute_output": 1_200_000}
    found = phase_breakdown(before, after)
    assert found["requests"] == 4
    assert found["success_ms"] == 5.0 and found["queue_ms"] == 0.25 and found["compute_infer_ms"] == 4.5
    assert phase_breakdown(before, before) == {}


def test_a_setting_reuses_the_built_encoders_with_its_own_configs(tmp_path):
    from support import make_tiny_bert, spec_from

    from ecomserve.bench.latency import respecified
    from ecomserve.repository.builder import build_repository, built_spec

    spec = spec_from({"encoders": [{"name": "tiny", "source": str(make_tiny_bert(tmp_path / "tiny", 4))}]})
    built = tmp_path / "built"
    build_repository(spec, built)
    change = {"max_queue_delay_us": 0, "idle_threads": 2, "scheduling": "normal", "pin_cores": False}
    target = respecified(built, setting_spec(spec, change), tmp_path, tmp_path / "copy")
    assert built_spec(target) == setting_spec(spec, change) and built_spec(built) == spec
    before, after = ((folder / "embedder" / "config.pbtxt").read_text() for folder in (built, target))
    assert "max_queue_delay_microseconds: 500" in before and "max_queue_delay_microseconds" not in after  # 0
    assert 'key: "idle_threads"\n  value {\n    string_value: "2"' in after
    assert 'key: "pin_cores"\n  value {\n    string_value: "true"' in before
    assert 'key: "pin_cores"\n  value {\n    string_value: "false"' in after
    # The server starts its processes with the spec's policy (server/process.py).
    assert scheduling_policy(built) == os.SCHED_BATCH and scheduling_policy(target) == os.SCHED_OTHER
    assert set(SCHEDULING_POLICIES) == set(get_args(ServingSpec.model_fields["scheduling"].annotation))
    caches = [(folder / "embed" / "config.pbtxt").read_text() for folder in (built, target)]
    assert "enable: true" in caches[0] and "enable: true" not in caches[1]  # the response cache is off
    files = sorted(p.relative_to(built) for p in built.rglob("*.onnx"))
    assert files and files == sorted(p.relative_to(target) for p in target.rglob("*.onnx"))


@pytest.mark.parametrize("pause", PAUSES)
def test_the_pause_before_each_call_is_taken_but_not_timed(pause):
    """Each in-process pause (idle, busy) lasts IDLE_BETWEEN_MS before every call and stays out of its latency."""
    before_each, _field = PAUSES[pause]
    point = measure("c", "query embed", "in-process", 1, lambda _w: lambda i: None, 1, 0.2, before_each=before_each)
    assert 1 <= point.requests <= 0.2 / (IDLE_BETWEEN_MS / 1e3) + 1  # at most one call per pause
    assert point.p50_ms < IDLE_BETWEEN_MS / 2  # the pause is not in the latency


def test_turns_merge_into_one_measurement_whose_percentiles_are_the_turns_median():
    turns = [
        Measurement("spec / front", "query embed", "grpc", 1, n, 1, 1.0, n, n, p50, p50 * 2, p50 * 3, 0)
        for n, p50 in ((100, 4.0), (300, 9.0), (200, 5.0))
    ]
    one = merged(turns)
    assert (one.requests, one.seconds, one.throughput_items) == (600, 3.0, 200.0)
    assert (one.p50_ms, one.p95_ms, one.p99_ms) == (5.0, 10.0, 15.0)  # a slow turn (9 ms) does not pull the median
    assert one.contender == "spec / front" and one.errors == 0


def _row(setting: str, route: str, clients: int, workload: str, p50: float, texts_per_s: float, **extra) -> dict:
    row = {"setting": setting, "route": route, "concurrency": clients, "workload": workload, "p50_ms": p50}
    return row | {"throughput_items": texts_per_s} | extra


def test_summary_sets_the_front_against_the_back_to_back_and_the_idle_in_process_runs():
    batch = f"batch embed {BATCH}"
    rows = [_row("spec", route, 1, "query embed", p50, 100) for route, p50 in (("front", 5.0), ("direct embed", 4.0))]
    rows += [
        _row("spec", "direct embedder", 1, "query embed", 3.8, 100),
        _row("spec", "front", 16, "query embed", 9, 500),
    ]
    rows += [_row("spec", "front", 4, batch, 90, 600), _row("spec", "front", 1, batch, 52, 610)]
    rows += [
        _row("in-process 2 thread", "in-process", 1, "query embed", 1.2, 800, idle_ms=0),
        _row("in-process 2 thread, 5 ms idle before each", "in-process", 1, "query embed", 2.7, 150, idle_ms=5.0),
        _row("in-process 2 thread, 5 ms busy before each", "in-process", 1, "query embed", 1.1, 150, busy_ms=5.0),
        _row("in-process 2 thread", "in-process", 1, batch, 40, 750, idle_ms=0),
        _row("in-process 1 thread", "in-process", 1, batch, 45, 700, idle_ms=0),
        # the served instance's own trick, shown but not the runtime the served figures are held against
        _row(SIDE_BY_SIDE, "in-process spread", 1, batch, 25, 1280, idle_ms=0),
    ]
    results = {"settings": {"spec": {}}, "rows": rows, "phases": {}, "cpu": "test CPU", "duration_s": 1}
    (found,) = summary(results)
    assert found["p50_over_in_process_ms"] == 5.0 - 1.2
    assert found["p50_over_idle_in_process_ms"] == 5.0 - 2.7
    assert found["batch32_vs_in_process"] == 600 / 750
    assert found["batch32_c1_p50_ms"] == 52 and found["batch32_c1_over_in_process_ms"] == 52 - 40
    assert f"| {SIDE_BY_SIDE} | | 25.0 | 1280 |" in latency_markdown(results)


def test_tritons_trace_splits_a_direct_query_into_spans_that_add_up(tmp_path):
    """A real tritonserver started with `trace_args`: only the requests inside `traced` are written, each with every
    span; the spans of a request sum to its time inside the server, which the client's time exceeds."""
    source = make_tiny_bert(tmp_path / "tiny", seed=5)
    spec = spec_from({"encoders": [{"name": "tiny", "source": str(source), "max_seq_len": 32}]})
    trace_file = tmp_path / "trace.json"
    server = start_server(spec, tmp_path, extra_args=triton_trace.trace_args(trace_file))
    texts = FreshTexts()
    try:
        call = grpc_embed(server.sockets.grpc_target, EMBEDDER)
        call([texts.query(0)])  # before tracing: not in the file
        with triton_trace.traced(server.sockets.grpc_target, EMBEDDER):
            for i in range(1, 11):
                call([texts.query(i)])
        call([texts.query(11)])  # after: not in the file either
    finally:
        server.stop()
    requests = triton_trace.request_timestamps(trace_file)
    assert len(requests) == 10
    for stamps in requests:
        spans = [stamps[end] - stamps[start] for start, end in triton_trace.SPANS.values()]
        start, end = triton_trace.IN_SERVER
        assert min(spans) >= 0 and sum(spans) == stamps[end] - stamps[start]  # the spans tile the server's time
    found = triton_trace.breakdown(trace_file, client_p50_ms=50.0)
    assert found["requests"] == 10 and 0 < found["execute_ms"] < found["in_server_ms"] < 50.0
    assert found["client_and_socket_ms"] == pytest.approx(50.0 - found["in_server_ms"])
