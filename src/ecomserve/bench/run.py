"""`ecomserve bench`: every contender on the same texts in one run.

1. variants of the spec's first encoder, built by the export pipeline and measured in-process;
2. PyTorch eager as sentence-transformers users run it (one query at a time, batches of 32);
3. the served variant in-process, through the same runner the server uses;
4. the served pipeline over gRPC and HTTP at several concurrencies;
5. with `--peer KIND=VENV` (issue 18): Infinity and fastembed from their own venvs, beside the served pipeline
   and the in-process runtime, on texts no request carried before (`--workload peers`: only this stage).
The single-query workload sends every contender queries no request of the run carried before (bench/texts.py, one
stream per run). The server runs on this machine too, so its numbers include sharing the CPU with the load
generator."""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ecomserve.bench import peers as peer_lib
from ecomserve.bench import variants as variant_lib
from ecomserve.bench.load import ROUNDS, Measurement, measure, take_turns
from ecomserve.bench.report import write_report
from ecomserve.bench.texts import UniqueTexts
from ecomserve.cpu import cpu_description
from ecomserve.evaluation import classify_accuracy, load_eval_set, mean_ndcg
from ecomserve.paths import corpus_texts, parity_texts
from ecomserve.repository.builder import build_repository
from ecomserve.runtime import MODEL_FILES, load_runner, run_by_length
from ecomserve.spec import PipelineSpec, resolve_source
from ecomserve.tokenization import TOKENIZER_FILE, TextTokenizer

WORKLOADS = {"query embed": 1, "batch embed 32": 32, "rank 1+100": 101}
# Serving settings tried against each other (query embed, gRPC, 16 clients) to pick the defaults.
TUNING = [
    {"layout": "fused", "instances": 2, "intra_op_threads": 1},
    {"layout": "fused", "instances": 1, "intra_op_threads": 2},
    {"layout": "ensemble", "instances": 2, "intra_op_threads": 1},
    {"layout": "fused", "instances": 2, "intra_op_threads": 1, "max_queue_delay_us": 2000},
]
# The peers comparison (issue 18): embed workloads only, at these client counts, on unique texts.
PEER_WORKLOADS = {"query embed": 1, "batch embed 32": 32}
PEER_POINTS = {"query embed": (1, 16), "batch embed 32": (1, 4)}
PEER_PARITY_TEXTS = 16
# The suffix of a contender measured a second time, in turns beside ecomserve (Infinity's best engine).
IN_TURNS = " (in turns)"


@dataclass
class BenchOptions:
    spec: PipelineSpec
    spec_dir: Path
    out_dir: Path = Path("bench_results")
    work_dir: Path = Path(".ecomserve/bench")
    duration_s: float = 5.0
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    protocols: list[str] = field(default_factory=lambda: ["grpc", "http"])
    variants: list[str] = field(default_factory=lambda: list(variant_lib.VARIANTS))
    tune: bool = True
    peers: list[peer_lib.Peer] = field(default_factory=list)
    # `--workload peers`: only the peers stage (no variants, no PyTorch rows, no tuning, no rank workload).
    peers_only: bool = False


def _texts(tokenizer: TextTokenizer, fresh: UniqueTexts):
    eval_set = load_eval_set()
    corpus = corpus_texts()
    queries = variant_lib.short_queries(tokenizer, corpus)
    titles = [t for t in corpus if t not in set(queries)]
    return variant_lib.Workloads(tokenizer, queries, titles, eval_set, new_query=fresh.next_query)


def _calls(embed, work: variant_lib.Workloads, rank) -> dict:
    """workload → call(i) for an in-process contender."""
    return {
        "query embed": lambda i: embed([work.new_query()]),  # issue 18's workload: one new short query per request
        "batch embed 32": lambda i: embed(work.title_batches[i % len(work.title_batches)]),
        "rank 1+100": lambda i: rank(work.queries[i % len(work.queries)], _candidates(work, i)),
    }


def _candidates(work: variant_lib.Workloads, i: int) -> list[str]:
    start = (i * 100) % (len(work.titles) - 100)
    return work.titles[start : start + 100]


def _in_process(contender: str, embed, work, duration_s: float) -> list[Measurement]:
    def rank(query: str, candidates: list[str]) -> np.ndarray:
        vectors = embed([query, *candidates])
        return vectors[1:] @ vectors[0]

    calls = _calls(embed, work, rank)
    return [
        measure(contender, name, "in-process", 1, lambda _w, c=calls[name]: c, WORKLOADS[name], duration_s)
        for name in WORKLOADS
    ]


def _served(server, protocol: str, concurrency: int, work, duration_s: float) -> list[Measurement]:
    from ecomserve.client import EcomClient

    url = server.http_url if protocol == "http" else server.grpc_url
    clients = [EcomClient(url, protocol) for _ in range(concurrency)]
    try:
        results = []
        for name in WORKLOADS:

            def make_call(w: int, name=name):
                client = clients[w]
                return _calls(client.embed, work, client.rank)[name]

            results.append(measure("served", name, protocol, concurrency, make_call, WORKLOADS[name], duration_s))
        return results
    finally:
        for client in clients:
            client.close()


def _tuned_spec(spec: PipelineSpec, setting: dict) -> PipelineSpec:
    serving = spec.serving
    batching = serving.dynamic_batching.model_copy(
        update={"max_queue_delay_us": setting.get("max_queue_delay_us", serving.dynamic_batching.max_queue_delay_us)}
    )
    changes = {k: v for k, v in setting.items() if k != "max_queue_delay_us"}
    serving = serving.model_copy(update=changes | {"dynamic_batching": batching, "response_cache": False})
    return spec.model_copy(update={"serving": serving})


def start_bench_server(repository: Path, work_dir: Path, extra_args: tuple[str, ...] = ()):
    from ecomserve.server.process import Ports, ServerOptions, TritonServer, free_port

    ports = Ports(free_port(), free_port(), free_port(), free_port())
    server = TritonServer(ServerOptions(repository, ports=ports, work_dir=work_dir, extra_args=list(extra_args)))
    server.start()
    return server


def tune(options: BenchOptions, work, console, progress) -> list[dict]:
    """Served query-embed throughput for each serving setting, same load, same texts."""
    rows = []
    task = progress.add_task("tuning", total=len(TUNING))
    for setting in TUNING:
        progress.update(task, description=f"tuning {setting}")
        repository = options.work_dir / "tuning"
        build_repository(_tuned_spec(options.spec, setting), repository, options.spec_dir, console)
        server = start_bench_server(repository, options.work_dir)
        try:
            (query,) = [m for m in _served(server, "grpc", 16, work, options.duration_s) if m.workload == "query embed"]
        finally:
            server.stop()
        rows.append(setting | {"texts_per_s": query.throughput_items, "p50_ms": query.p50_ms, "p99_ms": query.p99_ms})
        progress.advance(task)
    return rows


def server_rss_mb(pid: int) -> float:
    """Resident memory of tritonserver and its python-backend stubs."""
    server = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [server, *server.children()]) / 2**20


def _reference(source: Path):
    """fp32 PyTorch through sentence-transformers, as its users run it: texts → normalised vectors."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    reference_model = SentenceTransformer(str(source), device="cpu")

    def reference(texts: list[str]) -> np.ndarray:
        return reference_model.encode(texts, batch_size=32, normalize_embeddings=True)

    return reference


def _bench_repository(options: BenchOptions, console: Console) -> tuple[Path, Path]:
    """The served repository (response cache off) and the served encoder's model file in it."""
    spec = options.spec
    served_dir = options.work_dir / "repository"
    # The response cache would answer repeated texts without running the model: off for the benchmark.
    bench_spec = spec.model_copy(update={"serving": spec.serving.model_copy(update={"response_cache": False})})
    build_repository(bench_spec, served_dir, options.spec_dir, console)
    return served_dir, _served_model_file(served_dir, spec.encoders[0], spec)


def _runner_embedders(encoder, runner_path: Path, tokenizer: TextTokenizer) -> dict[str, object]:
    """contender name → embed(texts) through the served model file, in-process, on 1 and 2 threads."""
    embedders = {}
    # INT8 kernels scale differently with threads than fp32 ones: both are measured, the better one counts.
    for threads in (1, 2):
        runner = load_runner(encoder.runtime, runner_path, threads=threads)

        def in_process_embed(texts: list[str], runner=runner) -> np.ndarray:
            batch = tokenizer.encode(texts)
            return run_by_length(runner, batch.input_ids, batch.attention_mask)

        embedders[f"({threads} thread{'s' if threads > 1 else ''})"] = in_process_embed
    return embedders


def run_bench(options: BenchOptions, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    if options.peers_only:
        return run_peer_bench(options, console)
    spec = options.spec
    base = spec.encoders[0]
    source = resolve_source(base.source, options.spec_dir)
    tokenizer = TextTokenizer(source / TOKENIZER_FILE, base.max_seq_len)
    fresh = UniqueTexts(tokenizer)  # one stream for the run: the peers stage continues where the served points end
    work = _texts(tokenizer, fresh)
    reference = _reference(source)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    results: dict = _header(spec) | {
        "variants": [],
        "reference_ndcg5": mean_ndcg(work.eval_set, lambda q, items: reference(items) @ reference([q])[0]),
        "reference_classify": classify_accuracy(work.eval_set, reference),
    }
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("variants", total=len(options.variants))
        for name in options.variants:
            progress.update(task, description=f"variant: {name}")
            path, checks = variant_lib.build_variant(
                name, base, source, options.work_dir / "variants" / name.replace(" ", "_"), progress
            )
            encoder = variant_lib.variant_spec(base, variant_lib.VARIANTS[name])
            result = variant_lib.measure_variant(name, encoder, path, source, reference, work)
            results["variants"].append(asdict(result) | {"build_checks": checks["stages"]})
            progress.advance(task)

        measurements: list[Measurement] = []
        task = progress.add_task("in-process contenders", total=2)
        measurements += _in_process("pytorch eager", reference, work, options.duration_s)
        progress.advance(task)
        served_encoder = spec.encoders[0]
        served_dir, runner_path = _bench_repository(options, console)
        embedders = _runner_embedders(served_encoder, runner_path, tokenizer)
        for suffix, in_process_embed in embedders.items():
            measurements += _in_process(
                f"in-process served variant {suffix}", in_process_embed, work, options.duration_s
            )
        progress.advance(task)

        points = [(p, c) for p in options.protocols for c in options.concurrency]
        task = progress.add_task("served", total=len(points))
        server = start_bench_server(served_dir, options.work_dir)
        peer_rows: list[dict] = []
        try:
            for protocol, concurrency in points:
                progress.update(task, description=f"served {protocol} c={concurrency}")
                measurements += _served(server, protocol, concurrency, work, options.duration_s)
                progress.advance(task)
            results["server_rss_mb"] = server_rss_mb(server.pid)
        finally:
            server.stop()
        if options.peers:
            peer_rows, results["peers"], _ = _peers_on_a_fresh_server(
                options, served_dir, embedders, runner_path, fresh, source, reference, progress
            )
        results["tuning"] = tune(options, work, console, progress) if options.tune else []
    results["measurements"] = [m.row() for m in measurements] + peer_rows
    results["served_variant"] = served_variant_name(served_encoder)
    results["checks"] = done_checks(results) | (peer_checks(peer_rows, results["peers"]) if options.peers else {})
    return _saved(options, results)


def _header(spec: PipelineSpec) -> dict:
    """When, on what CPU (the numbers differ between machines) and how loaded, and with which spec."""
    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": cpu_description(),
        "load_average_before": list(os.getloadavg()),
        "spec": spec.model_dump(),
    }


def _saved(options: BenchOptions, results: dict) -> dict:
    """results.json and the report in the output folder; returns `results`."""
    options.out_dir.mkdir(parents=True, exist_ok=True)
    (options.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, options.out_dir)
    return results


def _peers_on_a_fresh_server(options: BenchOptions, served_dir: Path, *stage_args) -> tuple[list[dict], dict, float]:
    """`peer_stage(options, server, *stage_args)` on a server of its own, as each peer starts fresh (right after
    the overload points of a full run, 64 clients of 101-text rank requests, the same server measured 147 instead
    of 388 texts/s at 16 clients); also the server's RSS at the end."""
    server = start_bench_server(served_dir, options.work_dir)
    try:
        rows, info = peer_stage(options, server, *stage_args)
        return rows, info, server_rss_mb(server.pid)
    finally:
        server.stop()


def run_peer_bench(options: BenchOptions, console: Console) -> dict:
    """`--workload peers`: the served pipeline, the in-process runtime and the peers, embed workloads only."""
    spec = options.spec
    base = spec.encoders[0]
    source = resolve_source(base.source, options.spec_dir)
    tokenizer = TextTokenizer(source / TOKENIZER_FILE, base.max_seq_len)
    reference = _reference(source)
    results: dict = _header(spec) | {
        "variants": [],
        "tuning": [],
    }
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        served_dir, runner_path = _bench_repository(options, console)
        embedders = _runner_embedders(base, runner_path, tokenizer)
        rows, results["peers"], results["server_rss_mb"] = _peers_on_a_fresh_server(
            options, served_dir, embedders, runner_path, UniqueTexts(tokenizer), source, reference, progress
        )
    results["load_average_after"] = list(os.getloadavg())
    results["measurements"] = rows
    results["served_variant"] = served_variant_name(base)
    results["checks"] = peer_checks(rows, results["peers"])
    return _saved(options, results)


def _unique_calls(embed, texts: UniqueTexts) -> dict:
    """workload → call(i) that sends texts no request carried before (i is ignored)."""
    return {
        "query embed": lambda _i: embed([texts.next_query()]),
        "batch embed 32": lambda _i: embed(texts.next_titles(PEER_WORKLOADS["batch embed 32"])),
    }


def _peer_points(contender: str, protocol: str, make_embed, texts: UniqueTexts, duration_s: float) -> list[dict]:
    """Every PEER_POINTS point; `make_embed(worker)` gives that worker's own embed (own connection)."""
    rows = []
    for name, clients in PEER_POINTS.items():
        for concurrency in clients if protocol != "in-process" else (1,):

            def make_call(w: int, name=name):
                return _unique_calls(make_embed(w), texts)[name]

            measured = measure(contender, name, protocol, concurrency, make_call, PEER_WORKLOADS[name], duration_s)
            rows.append(measured.row() | {"texts": "unique"})
    return rows


def peer_stage(options: BenchOptions, server, embedders, runner_path, texts: UniqueTexts, source, reference, progress):
    """The served pipeline (gRPC, HTTP), the in-process runtime and each peer on the same unique texts;
    returns the measurement rows and what each peer ran (engine, files, versions, parity)."""
    duration = options.duration_s
    checks_texts = parity_texts()[:PEER_PARITY_TEXTS]
    peers_dir = options.work_dir / "peers"
    rows: list[dict] = []
    info: dict = {"unique_texts": True, "points": {k: list(v) for k, v in PEER_POINTS.items()}}
    infinity = next((peer for peer in options.peers if peer.kind == "infinity"), None)
    fastembed = next((peer for peer in options.peers if peer.kind == "fastembed"), None)
    in_turns = infinity is not None and bool(options.protocols)
    task = progress.add_task("peers stage", total=len(options.protocols) + 1 + (infinity is not None) + in_turns)
    for protocol in options.protocols:
        progress.update(task, description=f"ecomserve served {protocol}")
        with _served_embedders(server, protocol) as client_embed:
            rows += _peer_points("ecomserve served", protocol, client_embed, texts, duration)
        progress.advance(task)
    if fastembed is None:
        progress.update(task, description="ecomserve in-process")
        rows += _in_process_points(embedders, texts, duration)
    else:
        progress.update(task, description=f"ecomserve in-process and fastembed in turns ({ROUNDS} rounds)")
        found, info["fastembed"] = _fastembed_in_turns(
            fastembed, peers_dir / "fastembed", runner_path, source, texts, checks_texts, embedders, duration
        )
        rows += found
    progress.advance(task)
    # ecomserve's own served model against PyTorch fp32 on the parity texts: the bar an INT8 peer must meet.
    served = peer_lib.parity(embedders["(1 thread)"](checks_texts), reference(checks_texts), "pytorch fp32")
    info["ecomserve_served_parity"] = served
    if infinity is not None:
        progress.update(task, description="peer infinity")
        found, info["infinity"] = _infinity(
            infinity, peers_dir / "infinity", source, texts, checks_texts, reference, duration, served["min_cosine"]
        )
        rows += found
        progress.advance(task)
    if in_turns:
        progress.update(task, description=f"ecomserve and Infinity in turns ({ROUNDS} rounds)")
        rows += _infinity_in_turns(options, server, rows, info, source, texts, duration)
        progress.advance(task)
    return rows, info


@contextmanager
def _served_embedders(server, protocol: str):
    """`make_embed(worker)` for ecomserve served over `protocol`: each worker its own client, kept for that worker's
    later points (the front bounds connections) and closed after."""
    from ecomserve.client import EcomClient

    url = server.http_url if protocol == "http" else server.grpc_url
    clients: dict[int, EcomClient] = {}

    def make_embed(worker: int):
        if worker not in clients:
            clients[worker] = EcomClient(url, protocol)
        return clients[worker].embed

    try:
        yield make_embed
    finally:
        for client in clients.values():
            client.close()


def _infinity_in_turns(options: BenchOptions, server, rows, info, source, texts, duration) -> list[dict]:
    """The bar's points (PEER_MAIN_POINT) once more, ecomserve served (each protocol) and Infinity's best engine for
    that point (from the rows just measured) in turns: ROUNDS rounds, the order reversed each round, each
    contender's turns merged. Rows carry `turns`; `peer_checks` takes the throughput ratios from them."""
    peer = next(p for p in options.peers if p.kind == "infinity")
    failed = _failed_parity(info)
    engines = info["infinity"]["engines"]
    config_of = {record["contender"]: config for config, record in engines.items() if "contender" in record}
    best_for: dict[str, list[str]] = {}  # Infinity configuration -> the workloads it is best at
    for workload, (_short, clients) in PEER_MAIN_POINT.items():
        best = _best([r for r in rows if r["contender"] not in failed], workload, clients, "infinity")
        if best is not None:
            best_for.setdefault(config_of[best["contender"]], []).append(workload)
    found: list[dict] = []
    work_dir = options.work_dir / "peers" / "infinity"
    folders = peer_lib.prepare_infinity_folders(peer, source, work_dir / "onnx", info["infinity"]["versions"])
    for config, workloads in best_for.items():
        launch, infinity = _infinity_server(peer, config, folders, work_dir, source)
        try:
            found += _turns_beside(options, server, config, launch, infinity, workloads, texts, duration)
        except Exception as error:  # noqa: BLE001 - the rows measured one after another still stand
            engines[config]["in_turns_error"] = f"{type(error).__name__}: {error}"[:2000]
    return found


def _turns_beside(options: BenchOptions, server, config, launch, infinity, workloads, texts, duration) -> list[dict]:
    """Infinity's `config` started beside the ecomserve server, both measured in turns at `workloads`' main points."""
    found: list[dict] = []
    with infinity, ExitStack() as stack:
        contenders = {
            f"ecomserve served {protocol}": (
                "ecomserve served",
                protocol,
                stack.enter_context(_served_embedders(server, protocol)),
            )
            for protocol in options.protocols
        }
        contenders["infinity"] = (
            f"infinity {config}",
            "http",
            lambda _w, port=launch.port: peer_lib.infinity_embedder(port),
        )
        for workload in workloads:
            found += _in_turns(contenders, workload, PEER_MAIN_POINT[workload][1], texts, duration)
    return found


def _in_turns(contenders: dict, workload: str, clients: int, texts: UniqueTexts, duration_s: float) -> list[dict]:
    """`contenders` (name -> contender, protocol, make_embed) at one point, in ROUNDS turns of `duration_s` each."""

    def turn(contender: str, protocol: str, make_embed):
        def make_call(w: int):
            return _unique_calls(make_embed(w), texts)[workload]

        return lambda: [
            measure(contender, workload, protocol, clients, make_call, PEER_WORKLOADS[workload], duration_s)
        ]

    points = take_turns({name: turn(*contender) for name, contender in contenders.items()})
    return [p.row() | {"contender": f"{p.contender}{IN_TURNS}", "texts": "unique", "turns": ROUNDS} for p in points]


def _infinity(peer, work_dir: Path, source: Path, texts: UniqueTexts, checks_texts, reference, duration, served_min):
    """Each Infinity configuration in turn: start, check parity, measure, stop. One that fails is recorded
    with its error, and the others still run."""
    versions = peer_lib.peer_versions(peer)
    folders = peer_lib.prepare_infinity_folders(peer, source, work_dir / "onnx", versions)
    info: dict = {
        "how": "served over HTTP (OpenAI-style /embeddings), a child process on 127.0.0.1",
        "versions": versions,
        "engines": {},
    }
    rows: list[dict] = []
    for config, (_engine, folder_name) in peer_lib.INFINITY_CONFIGS.items():
        launch, server = _infinity_server(peer, config, folders, work_dir, source)
        record: dict = {"command": launch.command, "cwd": str(launch.cwd)}
        if folder_name:
            record["model_file"] = str(next(folders[folder_name].glob("*.onnx")))
        try:
            with server:
                probe = peer_lib.infinity_embedder(launch.port)
                vectors = probe(checks_texts)
                record["parity"] = peer_lib.parity(vectors, reference(checks_texts), "pytorch fp32", served_min)
                probe.close()
                contender = f"infinity {config}"
                rows += _peer_points(
                    contender, "http", lambda _w, port=launch.port: peer_lib.infinity_embedder(port), texts, duration
                )
                record["rss_mb"] = server.rss_mb
                record["contender"] = contender
        except Exception as error:  # noqa: BLE001 - one configuration failing leaves the others measured
            record["error"] = f"{type(error).__name__}: {error}"[:2000]
        # Infinity logs and carries on when its own graph optimisation fails (optimum 2.x): say so.
        record["own_optimization_failed"] = "Optimization failed" in server.log_text()
        info["engines"][config] = record
    return rows, info


def _infinity_server(peer, config: str, folders: dict[str, Path], work_dir: Path, source: Path):
    """Infinity's `config` ready to start on a free port, with a fresh HF_HOME (no optimised graph of an earlier
    start is reused): its launch and server."""
    from ecomserve.server.process import free_port

    name = config.replace(" ", "_")
    hf_home = work_dir / f"hf_home-{name}"
    shutil.rmtree(hf_home, ignore_errors=True)
    folder_name = peer_lib.INFINITY_CONFIGS[config][1]
    folder = folders[folder_name] if folder_name else None
    launch = peer_lib.infinity_launch(peer, config, free_port(), folder, source, hf_home)
    return launch, peer_lib.InfinityServer(launch, work_dir / f"infinity-{name}.log")


def _in_process_points(embedders: dict, texts: UniqueTexts, duration_s: float) -> list[dict]:
    """ecomserve's in-process runner, each thread count (`_runner_embedders`), at every PEER_POINTS point."""
    rows: list[dict] = []
    for suffix, embed in embedders.items():
        rows += _peer_points(f"ecomserve in-process {suffix}", "in-process", lambda _w, e=embed: e, texts, duration_s)
    return rows


def _fastembed_in_turns(
    peer, work_dir: Path, runner_path: Path, source, texts: UniqueTexts, checks_texts, embedders, duration
):
    """ecomserve's in-process runner and fastembed (in its own interpreter, on the served ONNX file) in turns: ROUNDS
    rounds, the order reversed each round, a turn being every thread count on both workloads for `duration` each;
    each contender's turns merged per point. Two runtimes of one file differ by less than this machine drifts in a
    minute: measured one after the other (run 11), ecomserve's came out at 0.77x fastembed's."""
    folder = peer_lib.prepare_fastembed_folder(runner_path, source, work_dir / "model")
    dim = embedders["(2 threads)"](checks_texts[:1]).shape[1]
    threads = (1, 2)
    results: list[dict] = []

    def ecomserve_turn() -> list[Measurement]:
        return [peer_lib.measurement_from_row(row) for row in _in_process_points(embedders, texts, duration)]

    def fastembed_turn() -> list[Measurement]:
        needed = peer_lib.fastembed_texts_needed(duration, len(threads))
        queries, titles = texts.take_queries(needed), texts.next_titles(needed)
        request = peer_lib.fastembed_request(folder, "int8", queries, titles, checks_texts, duration, dim, threads)
        results.append(peer_lib.run_fastembed(peer, request, work_dir))
        return [peer_lib.measurement_from_row(row) for row in results[-1]["measurements"]]

    points = take_turns({"ecomserve": ecomserve_turn, "fastembed": fastembed_turn})
    vectors = np.array(results[0]["parity_vectors"], dtype=np.float32)
    info = {
        "how": "in-process in its own interpreter (no serving cost), in turns with ecomserve in-process",
        "versions": results[0]["versions"],
        "model_file": str(runner_path),
        "pooling": peer_lib.FASTEMBED_POOLING,
        "exhausted": {name: any(r["exhausted"][name] for r in results) for name in PEER_WORKLOADS},
        "parity": peer_lib.parity(
            vectors, embedders["(2 threads)"](checks_texts), "ecomserve in-process, same ONNX file"
        ),
    }
    return [p.row() | {"texts": "unique", "turns": ROUNDS} for p in points], info


def _served_model_file(repository: Path, encoder, spec: PipelineSpec) -> Path:
    from ecomserve.contract import EMBEDDER
    from ecomserve.repository.configs import encoder_model

    folder = (
        repository / EMBEDDER / "1" / encoder.name
        if spec.serving.layout == "fused"
        else repository / encoder_model(encoder) / "1"
    )
    return folder / MODEL_FILES[encoder.runtime]


def served_variant_name(encoder) -> str:
    for name, changes in variant_lib.VARIANTS.items():
        spec = variant_lib.variant_spec(encoder, changes)
        if not changes.get("dynamic_int8") and spec == encoder:
            return name
    return "custom"


def _find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r[k] == v for k, v in match.items())), None)


def _ratio(ours: dict | None, theirs: dict, field: str) -> float | None:
    """ours[field] / theirs[field]; None when `ours` was not measured (--concurrency or --protocol left it out)."""
    return ours[field] / theirs[field] if ours is not None else None


def _items(row: dict) -> float:
    return row["throughput_items"]


def _p50(row: dict) -> float:
    return row["p50_ms"]


def done_checks(results: dict) -> dict:
    """The issue's bars, computed from this run's numbers (None for a bar whose point this run did not measure)."""
    rows = results["measurements"]
    torch_query = _find(rows, contender="pytorch eager", workload="query embed")
    torch_batch = _find(rows, contender="pytorch eager", workload="batch embed 32")
    served_query = _find(rows, contender="served", workload="query embed", protocol="grpc", concurrency=16)
    served_batch = max(
        (r for r in rows if r["contender"] == "served" and r["workload"] == "batch embed 32"), key=_items, default=None
    )
    served_rank = _find(rows, contender="served", workload="rank 1+100", protocol="grpc", concurrency=1)
    # The best in-process run of the served variant (1 or 2 threads) per workload: p50, or texts/s for titles.
    in_process = [r for r in rows if r["contender"].startswith("in-process")]
    in_process_rank = min((r for r in in_process if r["workload"] == "rank 1+100"), key=_p50)
    in_process_query = min((r for r in in_process if r["workload"] == "query embed"), key=_p50)
    in_process_titles = max((r for r in in_process if r["workload"] == "batch embed 32"), key=_items)
    in_process_titles_p50 = min((r for r in in_process if r["workload"] == "batch embed 32"), key=_p50)
    variants = {v["name"]: v for v in results["variants"]}
    served = variants.get(results["served_variant"], {})
    by_protocol = {}
    for protocol in ("grpc", "http"):
        one = _find(rows, contender="served", workload="query embed", protocol=protocol, concurrency=1)
        titles = _find(rows, contender="served", workload="batch embed 32", protocol=protocol, concurrency=4)
        one_titles = _find(rows, contender="served", workload="batch embed 32", protocol=protocol, concurrency=1)
        for key, served_one, in_process_one in (
            ("query", one, in_process_query),
            ("batch32", one_titles, in_process_titles_p50),
        ):
            by_protocol[f"served_{key}_c1_p50_{protocol}_over_in_process_ms"] = (
                served_one["p50_ms"] - in_process_one["p50_ms"] if served_one is not None else None
            )
        by_protocol[f"served_batch32_c4_{protocol}_vs_in_process"] = _ratio(
            titles, in_process_titles, "throughput_items"
        )
    return {
        "served_query_c16_vs_torch_b1": _ratio(served_query, torch_query, "throughput_items"),
        "served_batch32_vs_torch_b32": _ratio(served_batch, torch_batch, "throughput_items"),
        "served_rank_p50_vs_in_process": _ratio(served_rank, in_process_rank, "p50_ms"),
        **by_protocol,
        "served_variant_ndcg5": served.get("ndcg5"),
        "served_variant_classify": served.get("classify_accuracy"),
        "pytorch_fp32_ndcg5": results["reference_ndcg5"],
        "pytorch_fp32_classify": results["reference_classify"],
        "fastest_within_quality_bounds": fastest_within_bounds(results),
    }


# Issue 18's rule for the default: the fastest servable variant this close to PyTorch fp32 on the eval set.
MAX_NDCG_LOSS, MAX_CLASSIFY_LOSS = 0.01, 0.02


def fastest_within_bounds(results: dict) -> str | None:
    """The servable variant with the most queries/s among those within the quality bounds, if any. Variants of one
    architecture run the same graph, so their speeds differ by this machine's noise only: each is credited with the
    best of them, and among them the one nearest the full model (min cosine) is the pick."""
    ndcg, classify = results["reference_ndcg5"], results["reference_classify"]
    fit = [
        v
        for v in results["variants"]
        if v["servable"]
        and v["ndcg5"] >= ndcg - MAX_NDCG_LOSS
        and v["classify_accuracy"] >= classify - MAX_CLASSIFY_LOSS
    ]
    speed: dict[str, float] = {}
    for v in fit:
        speed[v["architecture"]] = max(speed.get(v["architecture"], 0.0), v["query_per_s"])
    return max(fit, key=lambda v: (speed[v["architecture"]], v["cosine_min"]), default={}).get("name")


def _best(rows: list[dict], workload: str, concurrency: int, prefix: str, protocol: str | None = None) -> dict | None:
    found = [
        r
        for r in rows
        if r["workload"] == workload
        and r["contender"].startswith(prefix)
        and r["concurrency"] == concurrency
        and (protocol is None or r["protocol"] == protocol)
        and r["requests"]
    ]
    return max(found, key=_items, default=None)


PEER_MAIN_POINT = {"query embed": ("query", 16), "batch embed 32": ("batch32", 4)}


def _failed_parity(info: dict) -> set[str]:
    """Contenders whose vectors are not the same model's (parity not ok): left out of the ratios."""
    engines = info.get("infinity", {}).get("engines", {})
    return {f"infinity {c}" for c, r in engines.items() if not r.get("parity", {}).get("ok", False)}


def peer_checks(rows: list[dict], info: dict) -> dict:
    """ecomserve ÷ each peer, per embed workload: served gRPC and HTTP texts/s at the workload's main client
    count (16 queries, 4 title batches) over the peer's at the same count (Infinity's best engine) or its
    in-process figure (fastembed, one caller, measured in turns with ecomserve's in-process, which it is also set
    beside); and at 1 client the p50 ratio (ecomserve ÷ peer: below 1 is faster). Plus each peer's parity cosine.
    A configuration that failed its parity check is left out. Against Infinity the main-count ratios come from the
    rows measured a second time in turns beside ecomserve (`_infinity_in_turns`) when the run has them."""
    checks: dict = {}
    failed = _failed_parity(info)
    turns = [r for r in rows if r["contender"].endswith(IN_TURNS)]
    rows = [r for r in rows if r["contender"] not in failed and not r["contender"].endswith(IN_TURNS)]
    for workload, (short, clients) in PEER_MAIN_POINT.items():
        for peer in ("infinity", "fastembed"):
            if peer not in info:
                continue
            main_clients = clients if peer == "infinity" else 1
            # Measured in turns (Infinity's best engine beside ecomserve) where the run has them.
            main_rows = turns if peer == "infinity" and _best(turns, workload, clients, peer) else rows
            theirs, theirs_c1 = _best(main_rows, workload, main_clients, peer), _best(rows, workload, 1, peer)
            if theirs is None:
                continue
            for protocol in ("grpc", "http"):
                ours = _best(main_rows, workload, clients, "ecomserve served", protocol)
                ours_c1 = _best(rows, workload, 1, "ecomserve served", protocol)
                if ours is not None:
                    checks[f"{short}_c{clients}_{protocol}_vs_{peer}"] = (
                        ours["throughput_items"] / theirs["throughput_items"]
                    )
                if ours_c1 is not None and theirs_c1 is not None:
                    checks[f"{short}_c1_p50_{protocol}_vs_{peer}"] = ours_c1["p50_ms"] / theirs_c1["p50_ms"]
            if peer == "fastembed":
                ours = _best(rows, workload, 1, "ecomserve in-process")
                if ours is not None:
                    checks[f"{short}_in_process_vs_fastembed"] = ours["throughput_items"] / theirs["throughput_items"]
    if "infinity" in info:
        for engine, record in info["infinity"]["engines"].items():
            if "parity" in record:
                checks[f"infinity_{engine}_parity_min_cosine"] = record["parity"]["min_cosine"]
    if "fastembed" in info:
        checks["fastembed_parity_min_cosine"] = info["fastembed"]["parity"]["min_cosine"]
    return checks
