"""`ecomserve bench --workload latency`: where one query's time goes, and what each serving setting does to it.

Per serving setting (the spec's own, then each change in SETTINGS), one server on the spec's model with the
response cache off, all of them up together, measured on texts never sent before, the settings in turns over
ROUNDS rounds (this machine's speed drifts within minutes; in turns, a drift falls on every setting alike), each
figure the median of its rounds:

- one query per request from 1 client: through the front (gRPC), straight to Triton's private socket to `embed`
  (the public ensemble) and to its `embedder` (the python model that tokenizes and runs the encoders), so the
  differences are the front's and the ensemble's cost; Triton's own statistics over the direct `embedder` runs
  split the server's time into queue (the dynamic-batching delay and waiting for an instance), input, the python
  model's execute (tokenizer, ONNX Runtime, the stub's IPC) and output; then, on the spec's server, more of the
  same requests with Triton's trace on (bench/trace.py), which adds its gRPC front end's share and, by difference
  from what the client measured, the client's and the socket's;
- one query per request from 16 clients and 32 titles per request from 1 and 4 clients, through the front (gRPC);
- the same tokenizer and runner in this process, at 1 and 2 threads (the in-process limit), and for one query also
  after IDLE_BETWEEN_MS of idling before each (what a run costs in the rhythm a served query arrives in) and after
  as long busy in a spin loop (what of that is waking from idle, and what is only time passing);
- memory: the spec's own server, response cache on (serving.response_cache_mb), under `soak_s` seconds of 16
  clients sending texts never sent before (every answer a new cache entry), its RSS (tritonserver, the stubs and
  the front) sampled every few seconds: it must level off once the cache is full.

While one setting is measured the other servers idle. Compare within a run."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ecomserve.bench import trace as triton_trace
from ecomserve.bench.load import ROUNDS, Measurement, grpc_embed, in_turns, measure, merged
from ecomserve.bench.report import plt, write_csv
from ecomserve.contract import EMBED, EMBEDDER
from ecomserve.cpu import cpu_description
from ecomserve.paths import corpus_texts
from ecomserve.repository.builder import BUILD_INFO, build_info, build_repository, plan, write_configs
from ecomserve.runtime import Spread, load_runner, run_by_length
from ecomserve.spec import PipelineSpec, resolve_source
from ecomserve.tokenization import TOKENIZER_FILE, TextTokenizer

# Each is applied to the spec's serving section on its own; "spec" is the spec unchanged.
SETTINGS: dict[str, dict] = {
    "spec": {},
    "500 us batching delay": {"max_queue_delay_us": 500},  # export/teacher.yaml's
    "two threads when idle": {"idle_threads": 2},  # export/teacher.yaml's; the default has one thread always
    # Without SCHED_BATCH (server/process.py) and without a core of its own per instance (cpu_share.pin_instance).
    "normal scheduling, no pinning": {"scheduling": "normal", "pin_cores": False},
    # A batch's chunks on its instance's core alone, even while the other instance idles (cpu_share.Spread).
    "chunks on one core": {"spread_batches": False},
}
BATCH = 32
# (route, clients, texts per request), each measured on every setting's server in every round.
POINTS = (
    ("front", 1, 1),
    ("direct embed", 1, 1),
    ("direct embedder", 1, 1),
    ("front", 16, 1),
    ("front", 1, BATCH),
    ("front", 4, BATCH),
)
# The in-process runtime is also measured with this idle time before each query: a served query reaches the encoder
# after a round trip during which its instance slept, and a run after idling is slower than one straight after
# another; this row is the in-process cost of that rhythm. The busy row pauses as long without the core idling: on
# 2026-12-03's VM it was as slow (README, "One query from one client, taken apart").
IDLE_BETWEEN_MS = 5.0


def _idle() -> None:
    time.sleep(IDLE_BETWEEN_MS / 1e3)


def _busy() -> None:
    """IDLE_BETWEEN_MS of running without touching memory: the core stays awake, its caches hold the runner's."""
    end = time.perf_counter() + IDLE_BETWEEN_MS / 1e3
    while time.perf_counter() < end:
        pass


# What runs before each in-process query of a row (untimed): the row's name and its field in the results.
PAUSES = {"idle": (_idle, "idle_ms"), "busy in a spin loop": (_busy, "busy_ms")}
SOAK_CLIENTS = 16
SIDE_BY_SIDE = "in-process, 1 thread + chunks side by side on a second core"
RSS_EVERY_S = 5.0
TRITON_PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


def respecified(built: Path, spec: PipelineSpec, spec_dir: Path, target: Path) -> Path:
    """A copy of the repository `built` with the configs (and build info) of `spec`, which differs from the one it
    was built from in serving settings only: the encoders are exported and verified once, not per setting."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(built, target)
    write_configs(spec, [encoder for encoder, _ in plan(spec, spec_dir)], target)
    info = build_info(target)
    (target / BUILD_INFO).write_text(json.dumps(info | {"spec": spec.model_dump()}, indent=2) + "\n")
    return target


def setting_spec(spec: PipelineSpec, change: dict) -> PipelineSpec:
    """The spec with one serving change, and the response cache off (a cached answer measures nothing)."""
    serving = spec.serving
    batching = serving.dynamic_batching.model_copy(
        update={k: v for k, v in change.items() if k in type(serving.dynamic_batching).model_fields}
    )
    rest = {k: v for k, v in change.items() if k in type(serving).model_fields}
    serving = serving.model_copy(update=rest | {"dynamic_batching": batching, "response_cache": False})
    return spec.model_copy(update={"serving": serving})


class FreshTexts:
    """Texts no request carried before: a shipped text and a number never used in this run."""

    def __init__(self) -> None:
        self.queries = corpus_texts()[:400]
        self._fresh = itertools.count()

    def query(self, i: int) -> str:
        return f"{self.queries[i % len(self.queries)]} {next(self._fresh)}"

    def titles(self, i: int) -> list[str]:
        return [self.query(i * BATCH + j) for j in range(BATCH)]


def triton_phases(url: str, model: str) -> dict[str, int]:
    """Cumulative success count and nanoseconds per phase of `model`'s newest version, from Triton's statistics."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"]
    finally:
        client.close()
    newest = max(stats, key=lambda s: int(s.get("version") or 0))["inference_stats"]
    totals = {"count": int(newest.get("success", {}).get("count", 0))}
    for phase in ("success", *TRITON_PHASES):
        totals[phase] = int(newest.get(phase, {}).get("ns", 0))
    return totals


def phase_breakdown(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Mean milliseconds per request in each phase between two `triton_phases` readings."""
    count = after["count"] - before["count"]
    if count <= 0:
        return {}
    phases = ("success", *TRITON_PHASES)
    return {"requests": count} | {f"{p}_ms": (after[p] - before[p]) / count / 1e6 for p in phases}


def _route(server, route: str) -> tuple[str, str]:
    """The gRPC address and model a route calls: the front's `embed`, or Triton's private socket."""
    direct = server.sockets.grpc_target
    return {"front": (server.grpc_url, EMBED), "direct embed": (direct, EMBED), "direct embedder": (direct, EMBEDDER)}[
        route
    ]


def _caller(url: str, model: str, texts: FreshTexts, size: int) -> Callable[[int], Callable[[int], object]]:
    def make_call(_worker: int) -> Callable[[int], object]:
        call = grpc_embed(url, model)
        return lambda i: call([texts.query(i)] if size == 1 else texts.titles(i))

    return make_call


def _served_in_turns(servers: dict, texts: FreshTexts, duration_s: float) -> tuple[list[dict], dict]:
    """Every setting's POINTS in ROUNDS turns, the settings' order reversed each round; Triton's statistics of
    `embedder` summed over the direct-embedder turns."""
    taken: dict[tuple[str, str, int, int], list[Measurement]] = defaultdict(list)
    spent: dict[str, Counter] = {name: Counter() for name in servers}
    for name in in_turns(list(servers)):
        server = servers[name]
        for route, clients, size in POINTS:
            url, model = _route(server, route)
            watched = route == "direct embedder"
            before = triton_phases(server.sockets.grpc_target, EMBEDDER) if watched else {}
            workload = "query embed" if size == 1 else f"batch embed {size}"
            make_call = _caller(url, model, texts, size)
            point = measure(f"{name} / {route}", workload, "grpc", clients, make_call, size, duration_s / ROUNDS)
            taken[name, route, clients, size].append(point)
            if watched:
                after = triton_phases(server.sockets.grpc_target, EMBEDDER)
                spent[name].update({k: after[k] - before[k] for k in after})
    rows = [merged(points).row() | {"setting": key[0], "route": key[1]} for key, points in taken.items()]
    return rows, {name: phase_breakdown(dict.fromkeys(total, 0), dict(total)) for name, total in spent.items()}


def _traced_p50_ms(server, texts: FreshTexts, duration_s: float) -> float:
    """One client's queries straight to `embedder` for `duration_s`, each traced by Triton; the client's p50."""
    url, model = _route(server, "direct embedder")
    with triton_trace.traced(url, model):
        point = measure("traced", "query embed", "grpc", 1, _caller(url, model, texts, 1), 1, duration_s)
    return point.p50_ms


def _in_process_rows(spec: PipelineSpec, spec_dir: Path, model_file: Path, texts: FreshTexts, duration_s: float):
    encoder = spec.encoders[0]
    tokenizer = TextTokenizer(resolve_source(encoder.source, spec_dir) / TOKENIZER_FILE, encoder.max_seq_len)
    rows = []

    def measured(name: str, workload: str, embed, pause: str | None = None) -> dict:
        size = 1 if workload == "query embed" else BATCH
        call = (lambda i: embed([texts.query(i)])) if size == 1 else (lambda i: embed(texts.titles(i)))
        before_each, field = PAUSES[pause] if pause else (None, None)
        point = measure(name, workload, "in-process", 1, lambda _w: call, size, duration_s, before_each=before_each)
        return point.row() | {"setting": name, "route": "in-process"} | ({field: IDLE_BETWEEN_MS} if field else {})

    for threads in (1, 2):
        run = load_runner(encoder.runtime, model_file, threads)

        def embed(batch: list[str], run=run) -> np.ndarray:
            tokens = tokenizer.encode(batch)
            return run_by_length(run, tokens.input_ids, tokens.attention_mask)

        name = f"in-process {threads} thread"
        rows.append(measured(name, "query embed", embed))
        for pause in PAUSES:
            rows.append(measured(f"{name}, {IDLE_BETWEEN_MS:.0f} ms {pause} before each", "query embed", embed, pause))
        rows.append(measured(name, f"batch embed {BATCH}", embed))
    # What the served instance does with an idle neighbour (runtime.Spread), in-process: shown beside the runtime's
    # own threads, not counted as "the in-process runtime" the served figures are held against.
    spread, narrow = Spread(lambda: True, [[]]), load_runner(encoder.runtime, model_file, 1)

    def spread_embed(batch: list[str]) -> np.ndarray:
        tokens = tokenizer.encode(batch)
        return run_by_length(narrow, tokens.input_ids, tokens.attention_mask, spread.run_tasks)

    try:
        rows.append(measured(SIDE_BY_SIDE, f"batch embed {BATCH}", spread_embed) | {"route": "in-process spread"})
    finally:
        spread.close()
    return rows


def served_rss_mb(server) -> float:
    """Resident memory of tritonserver, its python-backend stubs and the front."""
    from ecomserve.bench.run import server_rss_mb

    return server_rss_mb(server.pid) + server_rss_mb(server.front_pid)


def memory_soak(server, texts: FreshTexts, soak_s: float) -> list[dict]:
    """RSS every RSS_EVERY_S seconds while SOAK_CLIENTS clients send fresh queries for `soak_s` seconds."""
    answered = [0] * SOAK_CLIENTS  # per worker: only its own thread writes its slot
    samples = [{"t_s": 0.0, "rss_mb": served_rss_mb(server), "requests": 0}]
    done = threading.Event()

    def sample() -> None:
        began = time.perf_counter()
        while not done.wait(RSS_EVERY_S):
            elapsed = time.perf_counter() - began
            samples.append({"t_s": elapsed, "rss_mb": served_rss_mb(server), "requests": sum(answered)})

    def make_call(worker: int) -> Callable[[int], object]:
        call = grpc_embed(server.grpc_url, EMBED)

        def send(i: int) -> None:
            call([texts.query(i)])
            answered[worker] += 1

        return send

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        measure("memory soak", "query embed", "grpc", SOAK_CLIENTS, make_call, 1, soak_s)
    finally:
        done.set()
        sampler.join()
    samples.append({"t_s": soak_s, "rss_mb": served_rss_mb(server), "requests": sum(answered)})
    return samples


def run_latency_bench(
    spec: PipelineSpec,
    spec_dir: Path,
    out_dir: Path,
    duration_s: float,
    console: Console,
    work_dir: Path,
    soak_s: float = 120.0,
) -> dict:
    from ecomserve.bench.run import _served_model_file, start_bench_server

    if spec.serving.layout != "fused":
        raise ValueError("--workload latency measures the fused layout (serving.layout: fused, the cpu default)")
    texts = FreshTexts()
    results: dict = {"cpu": cpu_description(), "duration_s": duration_s, "settings": SETTINGS, "rows": [], "phases": {}}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("latency", total=len(SETTINGS) + 2 + (soak_s > 0))
        built = work_dir / "latency" / "built"
        build_repository(spec, built, spec_dir, console)
        trace_file = work_dir / "latency" / "trace.json"
        trace_file.unlink(missing_ok=True)
        servers = {}
        try:
            for name, change in SETTINGS.items():
                progress.update(task, description=f"latency: starting {name}")
                repository = work_dir / "latency" / re.sub(r"\W+", "_", name)
                respecified(built, setting_spec(spec, change), spec_dir, repository)
                traced = triton_trace.trace_args(trace_file) if name == "spec" else ()
                servers[name] = start_bench_server(repository, work_dir, traced)
                progress.advance(task)
            progress.update(task, description=f"latency: the settings in turns ({ROUNDS} rounds)")
            results["rows"], results["phases"] = _served_in_turns(servers, texts, duration_s)
            progress.update(task, description="latency: one client traced by Triton")
            client_p50_ms = _traced_p50_ms(servers["spec"], texts, duration_s / ROUNDS)
            progress.advance(task)
        finally:
            for server in servers.values():
                server.stop()  # Triton writes the trace file as it stops
        results["trace"] = triton_trace.breakdown(trace_file, client_p50_ms)
        progress.update(task, description="latency: in-process")
        model_file = _served_model_file(repository, spec.encoders[0], spec)
        results["rows"] += _in_process_rows(spec, spec_dir, model_file, texts, duration_s)
        progress.advance(task)
        if soak_s > 0:
            progress.update(task, description=f"memory: {soak_s:.0f} s of fresh texts, response cache on")
            server = start_bench_server(built, work_dir)  # the spec as it is: the response cache on
            try:
                results["memory"] = {
                    "response_cache_mb": spec.serving.response_cache_mb if spec.serving.response_cache else 0,
                    "samples": memory_soak(server, texts, soak_s),
                }
            finally:
                server.stop()
            progress.advance(task)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latency.json").write_text(json.dumps(results, indent=2))
    write_csv(out_dir / "latency.csv", results["rows"])
    plot_latency(results, out_dir / "latency.png")
    (out_dir / "latency.md").write_text(latency_markdown(results) + "\n")
    return results


def _pick(rows: list[dict], setting: str, route: str, concurrency: int, workload: str) -> dict | None:
    match = (setting, route, concurrency, workload)
    return next((r for r in rows if (r["setting"], r["route"], r["concurrency"], r["workload"]) == match), None)


def summary(results: dict) -> list[dict]:
    """Per serving setting: the 1-client p50 by route, throughput at 16 clients and of 32-title batches at 4,
    and the same against the best in-process runtime."""
    rows, batch = results["rows"], f"batch embed {BATCH}"
    in_process = [r for r in rows if r["route"] == "in-process"]
    queries = [r for r in in_process if r["workload"] == "query embed"]
    best_query = min(r["p50_ms"] for r in queries if not any(r.get(field) for _, field in PAUSES.values()))
    best_idle_query = min((r["p50_ms"] for r in queries if r.get("idle_ms")), default=float("nan"))
    best_batch = max(r["throughput_items"] for r in in_process if r["workload"] == batch)
    best_batch_p50 = min(r["p50_ms"] for r in in_process if r["workload"] == batch)
    table = []
    for name in results["settings"]:
        one = {
            route: _pick(rows, name, route, 1, "query embed") for route in ("front", "direct embed", "direct embedder")
        }
        many, titles = _pick(rows, name, "front", 16, "query embed"), _pick(rows, name, "front", 4, batch)
        one_batch = _pick(rows, name, "front", 1, batch)
        table.append(
            {
                "setting": name,
                "p50_front_ms": one["front"]["p50_ms"],
                "p50_direct_embed_ms": one["direct embed"]["p50_ms"],
                "p50_direct_embedder_ms": one["direct embedder"]["p50_ms"],
                "p50_over_in_process_ms": one["front"]["p50_ms"] - best_query,
                "p50_over_idle_in_process_ms": one["front"]["p50_ms"] - best_idle_query,
                "query_c16_texts_per_s": many["throughput_items"],
                "batch32_c1_p50_ms": one_batch["p50_ms"],
                "batch32_c1_over_in_process_ms": one_batch["p50_ms"] - best_batch_p50,
                "batch32_c4_texts_per_s": titles["throughput_items"],
                "batch32_vs_in_process": titles["throughput_items"] / best_batch,
            }
            | {f"triton_{k}": v for k, v in results["phases"].get(name, {}).items()}
        )
    return table


def latency_markdown(results: dict) -> str:
    rows, batch = results["rows"], f"batch embed {BATCH}"
    in_process = {r["setting"]: r for r in rows if r["route"] == "in-process" and r["workload"] == "query embed"}
    in_batch = {r["setting"]: r for r in rows if r["route"].startswith("in-process") and r["workload"] == batch}
    lines = [
        f"Latency ({results['cpu']}; {results['duration_s']:.0f} s per point; texts never sent before, cache off)",
        "",
        "| setting | 1 client p50 (ms): front | direct `embed` | direct `embedder` | − in-process | "
        f"− in-process after {IDLE_BETWEEN_MS:.0f} ms idle | Triton `embedder`: queue / execute (ms) | 16 clients "
        "(texts/s) | 32 titles, 1 client p50 (ms) / − in-process | 32 titles, 4 clients (texts/s) | ÷ in-process |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary(results):
        lines.append(
            f"| {s['setting']} | {s['p50_front_ms']:.2f} | {s['p50_direct_embed_ms']:.2f} | "
            f"{s['p50_direct_embedder_ms']:.2f} | {s['p50_over_in_process_ms']:+.2f} | "
            f"{s['p50_over_idle_in_process_ms']:+.2f} | "
            f"{s.get('triton_queue_ms', float('nan')):.2f} / {s.get('triton_compute_infer_ms', float('nan')):.2f} | "
            f"{s['query_c16_texts_per_s']:.0f} | "
            f"{s['batch32_c1_p50_ms']:.1f} / {s['batch32_c1_over_in_process_ms']:+.1f} | "
            f"{s['batch32_c4_texts_per_s']:.0f} | {s['batch32_vs_in_process']:.2f} |"
        )
    lines += ["", "| in-process | 1 query p50 (ms) | 32 titles p50 (ms) | 32 titles (texts/s) |", "|---|---|---|---|"]
    for name, row in in_process.items():
        titles = in_batch.get(name)  # idle rows: queries only
        batch_cells = f"{titles['p50_ms']:.1f} | {titles['throughput_items']:.0f}" if titles else " | "
        lines.append(f"| {name} | {row['p50_ms']:.2f} | {batch_cells} |")
    for name, titles in in_batch.items():
        if name not in in_process:  # titles only: chunks side by side
            lines.append(f"| {name} | | {titles['p50_ms']:.1f} | {titles['throughput_items']:.0f} |")
    trace = results.get("trace")
    if trace:
        spans = " / ".join(f"{trace[f'{span}_ms']:.2f}" for span in triton_trace.SPANS)
        lines += [
            "",
            f"Triton's trace, one query from 1 client straight to `embedder`, the spec's server ({trace['requests']} "
            f"requests, medians, ms): client {trace['client_ms']:.2f} = tritonserver {trace['in_server_ms']:.2f} + "
            f"the client and the socket {trace['client_and_socket_ms']:.2f}; inside: {' / '.join(triton_trace.SPANS)}"
            f" {spans}",
        ]
    memory = results.get("memory")
    if memory:
        first, middle, last = (memory["samples"][i] for i in (0, len(memory["samples"]) // 2, -1))
        lines += [
            "",
            f"Memory (response cache {memory['response_cache_mb']} MiB): server RSS {first['rss_mb']:.0f} MB at "
            f"start, {middle['rss_mb']:.0f} MB after {middle['t_s']:.0f} s, {last['rss_mb']:.0f} MB after "
            f"{last['t_s']:.0f} s and {last['requests']} fresh queries",
        ]
    return "\n".join(lines)


def plot_latency(results: dict, path: Path) -> None:
    table = summary(results)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(table))
    for offset, (key, label) in zip(
        (-0.27, 0, 0.27),
        (
            ("p50_front_ms", "front"),
            ("p50_direct_embed_ms", "direct embed"),
            ("p50_direct_embedder_ms", "direct embedder"),
        ),
    ):
        axes[0].bar(x + offset, [s[key] for s in table], 0.27, label=label)
    axes[0].set(title="one query, 1 client: p50", ylabel="ms", xticks=x, xticklabels=[s["setting"] for s in table])
    axes[0].tick_params(axis="x", labelrotation=20, labelsize=7)
    axes[0].legend(fontsize=7)
    axes[1].bar(x - 0.2, [s["query_c16_texts_per_s"] for s in table], 0.4, label="1 query, 16 clients")
    axes[1].bar(x + 0.2, [s["batch32_c4_texts_per_s"] for s in table], 0.4, label="32 titles, 4 clients")
    axes[1].set(
        title="throughput through the front", ylabel="texts / s", xticks=x, xticklabels=[s["setting"] for s in table]
    )
    axes[1].tick_params(axis="x", labelrotation=20, labelsize=7)
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
