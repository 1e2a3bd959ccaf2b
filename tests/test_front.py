"""The front's request policy and its benchmark, on a real server: which APIs a path reaches, and
`ecomserve bench --workload front` measuring both routes in one run."""

from __future__ import annotations

import pytest

from ecomserve.bench.front import (
    API_ROUTES,
    CONCURRENCY,
    ROUTES,
    api_cost,
    front_cost,
    front_markdown,
    plot_front,
    run_front_bench,
)
from ecomserve.front.policy import GRPC_ACCESS, Access, http_access


@pytest.mark.parametrize(
    ("method", "path", "access", "model"),
    [
        ("GET", "/v2/health/ready", Access.HEALTH, None),
        ("HEAD", "/v2", Access.OPEN, None),
        ("GET", "/v2/models/embed/versions/2/config", Access.OPEN, "embed"),
        ("POST", "/v2/models/rank/infer", Access.INFER, "rank"),
        ("POST", "/v2/models/embed/versions/3/infer", Access.INFER, "embed"),
        ("GET", "/v2/models/embed/infer", Access.UNKNOWN, None),
        ("POST", "/v2/repository/models/embed/load", Access.ADMIN, None),
        ("POST", "/v2/systemsharedmemory/region/x/register", Access.CLOSED, None),
        ("GET", "/v2/logging", Access.CLOSED, None),
        ("POST", "/v2/models/embed/trace/setting", Access.CLOSED, None),
        ("POST", "/v2/models/../../etc/passwd/infer", Access.UNKNOWN, None),
    ],
)
def test_http_paths_map_to_their_access(method, path, access, model):
    assert http_access(method, path) == (access, model)


def test_every_grpc_method_is_classified():
    from tritonclient.grpc import service_pb2

    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = {f"/inference.GRPCInferenceService/{m.name}" for m in service.methods}
    assert methods <= GRPC_ACCESS.keys(), (
        f"a new Triton method must be classified on purpose: {methods - GRPC_ACCESS.keys()}"
    )
    assert GRPC_ACCESS["/inference.GRPCInferenceService/ModelInfer"] is Access.INFER
    assert "/inference.GRPCInferenceService/NewMethod" not in GRPC_ACCESS


@pytest.mark.integration
def test_front_bench_measures_both_routes_in_one_run(default_server, tmp_path):
    rows = run_front_bench(default_server, ["wireless earbuds", "trail shoes"], duration_s=0.3, rounds=2)
    # Per round: HTTP front, direct and the two API routes, gRPC front and direct, each at 1 and 16 clients.
    assert len(rows) == 2 * (4 + 2) * len(CONCURRENCY)
    assert {(r["protocol"], r["contender"], r["concurrency"]) for r in rows} == {
        (protocol, route, clients)
        for protocol, routes in (("http", (*ROUTES, *API_ROUTES)), ("grpc", ROUTES))
        for route in routes
        for clients in CONCURRENCY
    }
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in rows), rows
    cost, api = front_cost(rows), api_cost(rows)
    assert len(cost) == 4 and all(c["throughput_ratio"] > 0 for c in cost)
    assert {c["route"] for c in api} == set(API_ROUTES) and all(c["throughput_ratio"] > 0 for c in api)
    plot_front(cost, tmp_path / "front.png")
    assert (tmp_path / "front.png").stat().st_size > 1000
    table = front_markdown({"cpu": "test", "duration_s": 0.5, "cost": cost, "api": api})
    assert "| grpc | 16 |" in table and "| api openai | 16 |" in table


def test_a_repeated_log_line_is_written_at_most_burst_times_per_window():
    """20,100 held connections once wrote 1.36 GB of "accept(): Too many open files" in 45 s."""
    import logging

    from ecomserve.front.service import RepeatFilter

    repeat = RepeatFilter(burst=3, window_s=60)

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)

    assert sum(repeat.filter(record("accept(): Too many open files")) for _ in range(10_000)) == 3
    assert repeat.filter(record("a different problem"))


def test_a_huge_log_is_explained_from_its_tail(tmp_path):
    from ecomserve.server.process import ServerOptions, TritonServer, read_tail

    log = tmp_path / "tritonserver.log"
    with log.open("w") as handle:
        for _ in range(100_000):
            handle.write("E1201 10:00:00.000 1 http_server.cc:1] accept(): Too many open files\n")
        handle.write("E1201 10:00:01.000 1 server.cc:2] the last problem\n")
    assert log.stat().st_size > 5_000_000
    assert len(read_tail(log)) <= 256 * 1024
    excerpt = TritonServer(ServerOptions(tmp_path, work_dir=tmp_path)).log_excerpt(log)
    assert excerpt.splitlines()[-1].endswith("the last problem")
