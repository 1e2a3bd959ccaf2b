"""`ecomserve bench --workload front`: what the front process and its HTTP API cost.

One query per request, at 1 and 16 clients, on texts never sent before (and the response cache off),
through the front (the public ports), straight to Triton's private unix sockets, and through the HTTP
API (OpenAI's /v1/embeddings and TEI's /embed), in one run of one server. HTTP uses one plain
keep-alive client for every HTTP route (TCP to the front and the API, the unix socket to Triton); gRPC
uses tritonclient for both its routes. The direct route exists only for this measurement: clients
cannot reach it."""

from __future__ import annotations

import http.client
import itertools
import json
import socket
from pathlib import Path

import numpy as np
from rich.console import Console

from ecomserve.bench.load import grpc_embed, measure
from ecomserve.bench.report import plt, write_csv
from ecomserve.contract import EMBED, TEXT
from ecomserve.cpu import cpu_description
from ecomserve.front.api.context import model_id
from ecomserve.paths import corpus_texts
from ecomserve.repository.builder import build_repository, built_spec
from ecomserve.spec import PipelineSpec

CONCURRENCY = (1, 16)
ROUTES = ("front", "direct")
# The HTTP API's routes, measured beside KServe v2 over HTTP through the front: (path, JSON body of a text).
API_ROUTES = {
    "api openai": ("/v1/embeddings", lambda text, model: {"input": text, "model": model, "encoding_format": "float"}),
    "api tei": ("/embed", lambda text, _model: {"inputs": text}),
}


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path):
        super().__init__("triton")
        self._path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


def _kserve_body(text: str) -> dict:
    return {"inputs": [{"name": TEXT, "datatype": "BYTES", "shape": [1, 1], "data": [text]}]}


def _http_call(connect, path: str = "/v2/models/embed/infer", body=_kserve_body):
    connection = connect()

    def call(text: str) -> None:
        connection.request("POST", path, json.dumps(body(text)).encode(), {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(payload[:200])

    return call


def _grpc_call(url: str):
    call = grpc_embed(url, EMBED)
    return lambda text: call([text])


def _route_call(server, protocol: str, route: str):
    host, port = server.http_url.split(":")
    if route in API_ROUTES:
        path, body = API_ROUTES[route]
        model = model_id(built_spec(server.options.repository))
        connect = lambda: http.client.HTTPConnection(host, server.options.ports.api, timeout=60)  # noqa: E731
        return _http_call(connect, path, lambda text: body(text, model))
    if protocol == "http":
        if route == "front":
            return _http_call(lambda: http.client.HTTPConnection(host, int(port), timeout=60))
        return _http_call(lambda: _UnixHTTPConnection(server.sockets.http_path))
    return _grpc_call(server.grpc_url if route == "front" else server.sockets.grpc_target)


def run_front_bench(server, queries: list[str], duration_s: float, rounds: int = 3) -> list[dict]:
    """Every point `rounds` times, the two routes back to back each time: on a small shared machine the
    speed drifts between minutes, and the ratio of neighbours is what the front costs."""
    fresh = itertools.count()
    rows = []
    for round_ in range(rounds):
        for protocol, concurrency, route in _points_to_measure():

            def make_call(_worker: int, route=route, protocol=protocol):
                call = _route_call(server, protocol, route)
                # A number no request carried before: nothing can be answered from a cache.
                return lambda i: call(f"{queries[i % len(queries)]} {next(fresh)}")

            measured = measure(route, "query embed", protocol, concurrency, make_call, 1, duration_s)
            rows.append(measured.row() | {"round": round_})
    return rows


def _points_to_measure() -> list[tuple[str, int, str]]:
    grpc = [("grpc", c, route) for c, route in itertools.product(CONCURRENCY, ROUTES)]
    return [("http", c, route) for c, route in itertools.product(CONCURRENCY, (*ROUTES, *API_ROUTES))] + grpc


def _points(rows: list[dict], protocol: str, concurrency: int, route: str) -> list[dict]:
    chosen = [r for r in rows if (r["protocol"], r["concurrency"], r["contender"]) == (protocol, concurrency, route)]
    return sorted(chosen, key=lambda r: r["round"])


def _median(points: list[dict], field: str) -> float:
    return float(np.median([point[field] for point in points]))


def front_cost(rows: list[dict]) -> list[dict]:
    """Per protocol and concurrency, medians over the rounds: throughput through the front and straight to
    Triton, the ratio of the two (per round, then the median), and the p50 and p99 the front adds."""
    costs = []
    for protocol, concurrency in itertools.product(("http", "grpc"), CONCURRENCY):
        front, direct = (_points(rows, protocol, concurrency, route) for route in ROUTES)
        ratios = [f["throughput_items"] / d["throughput_items"] for f, d in zip(front, direct)]
        costs.append(
            {
                "protocol": protocol,
                "concurrency": concurrency,
                "front_texts_per_s": _median(front, "throughput_items"),
                "direct_texts_per_s": _median(direct, "throughput_items"),
                "throughput_ratio": float(np.median(ratios)),
                "added_p50_ms": _median(front, "p50_ms") - _median(direct, "p50_ms"),
                "added_p99_ms": _median(front, "p99_ms") - _median(direct, "p99_ms"),
            }
        )
    return costs


def api_cost(rows: list[dict]) -> list[dict]:
    """Per API route and concurrency, against KServe v2 over HTTP through the front (same rounds): the
    throughput ratio (per round, then the median) and the p50 it adds."""
    costs = []
    for route, concurrency in itertools.product(API_ROUTES, CONCURRENCY):
        api, kserve = _points(rows, "http", concurrency, route), _points(rows, "http", concurrency, "front")
        ratios = [a["throughput_items"] / k["throughput_items"] for a, k in zip(api, kserve)]
        costs.append(
            {
                "route": route,
                "concurrency": concurrency,
                "api_texts_per_s": _median(api, "throughput_items"),
                "kserve_http_texts_per_s": _median(kserve, "throughput_items"),
                "throughput_ratio": float(np.median(ratios)),
                "api_p50_ms": _median(api, "p50_ms"),
                "kserve_http_p50_ms": _median(kserve, "p50_ms"),
                "added_p50_ms": _median(api, "p50_ms") - _median(kserve, "p50_ms"),
            }
        )
    return costs


def plot_front(costs: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{c['protocol']} c={c['concurrency']}" for c in costs]
    x = np.arange(len(costs))
    axes[0].bar(x - 0.2, [c["direct_texts_per_s"] for c in costs], 0.4, label="straight to Triton")
    axes[0].bar(x + 0.2, [c["front_texts_per_s"] for c in costs], 0.4, label="through the front")
    axes[0].set(title="one query per request", ylabel="texts / s", xticks=x, xticklabels=labels)
    axes[0].legend(fontsize=8)
    axes[1].bar(x, [c["added_p50_ms"] for c in costs])
    axes[1].set(title="p50 latency the front adds", ylabel="ms", xticks=x, xticklabels=labels)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def front_markdown(results: dict) -> str:
    lines = [
        f"Front cost ({results['cpu']}; one query per request; medians of 3 rounds of "
        f"{results['duration_s']:.0f} s per point, the two routes back to back)",
        "",
        "| protocol | clients | straight to Triton (texts/s) | through the front | ratio "
        "| p50 added (ms) | p99 added (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in results["cost"]:
        lines.append(
            f"| {c['protocol']} | {c['concurrency']} | {c['direct_texts_per_s']:.0f} | {c['front_texts_per_s']:.0f} | "
            f"{c['throughput_ratio']:.2f} | {c['added_p50_ms']:+.2f} | {c['added_p99_ms']:+.2f} |"
        )
    lines += [
        "",
        "| HTTP API route | clients | KServe v2 HTTP (texts/s) | API | ratio | KServe p50 (ms) | API p50 | added |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in results["api"]:
        lines.append(
            f"| {c['route']} | {c['concurrency']} | {c['kserve_http_texts_per_s']:.0f} | {c['api_texts_per_s']:.0f} | "
            f"{c['throughput_ratio']:.2f} | {c['kserve_http_p50_ms']:.2f} | {c['api_p50_ms']:.2f} | "
            f"{c['added_p50_ms']:+.2f} |"
        )
    return "\n".join(lines)


def bench_front(spec: PipelineSpec, spec_dir: Path, out_dir: Path, duration_s: float, console: Console) -> dict:
    from ecomserve.bench.run import start_bench_server

    repository = Path(".ecomserve/bench/front-repository")
    # The cache would answer without computing; the fresh suffix makes sure, this makes it cheap.
    bench_spec = spec.model_copy(update={"serving": spec.serving.model_copy(update={"response_cache": False})})
    build_repository(bench_spec, repository, spec_dir, console)
    queries = corpus_texts()[:400]
    server = start_bench_server(repository, Path(".ecomserve/bench"))
    try:
        with console.status("measuring the front against straight-to-Triton calls …"):
            rows = run_front_bench(server, queries, duration_s)
    finally:
        server.stop()
    results = {
        "cpu": cpu_description(),
        "duration_s": duration_s,
        "measurements": rows,
        "cost": front_cost(rows),
        "api": api_cost(rows),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "front.json").write_text(json.dumps(results, indent=2))
    write_csv(out_dir / "front.csv", rows)
    plot_front(results["cost"], out_dir / "front.png")
    (out_dir / "front.md").write_text(front_markdown(results) + "\n")
    return results
