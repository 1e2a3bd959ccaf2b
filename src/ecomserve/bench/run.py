"""`ecomserve bench`: every contender on the same texts in one run.

1. variants of the spec's first encoder, built by the export pipeline and measured in-process;
2. PyTorch eager as sentence-transformers users run it (one query at a time, batches of 32);
3. the served variant in-process, through the same runner the server uses;
4. the served pipeline over gRPC and HTTP at several concurrencies.
The server runs on this machine too, so its numbers include sharing the CPU with the load generator."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ecomserve.bench import variants as variant_lib
from ecomserve.bench.load import Measurement, measure
from ecomserve.bench.report import write_report
from ecomserve.evaluation import load_eval_set, mean_ndcg
from ecomserve.paths import corpus_texts
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


def _texts(tokenizer: TextTokenizer):
    eval_set = load_eval_set()
    corpus = corpus_texts()
    queries = variant_lib.short_queries(tokenizer, corpus)
    titles = [t for t in corpus if t not in set(queries)]
    return variant_lib.Workloads(tokenizer, queries, titles, eval_set)


def _calls(embed, work: variant_lib.Workloads, rank) -> dict:
    """workload → call(i) for an in-process contender."""
    return {
        "query embed": lambda i: embed([work.queries[i % len(work.queries)]]),
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


def start_bench_server(repository: Path, work_dir: Path):
    from ecomserve.server.process import Ports, ServerOptions, TritonServer, free_port

    server = TritonServer(
        ServerOptions(repository, ports=Ports(free_port(), free_port(), free_port(), free_port()), work_dir=work_dir)
    )
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


def run_bench(options: BenchOptions, console: Console | None = None) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    console = console or Console(stderr=True)
    spec = options.spec
    base = spec.encoders[0]
    source = resolve_source(base.source, options.spec_dir)
    tokenizer = TextTokenizer(source / TOKENIZER_FILE, base.max_seq_len)
    work = _texts(tokenizer)
    torch.set_num_threads(2)
    reference_model = SentenceTransformer(str(source), device="cpu")

    def reference(texts: list[str]) -> np.ndarray:
        return reference_model.encode(texts, batch_size=32, normalize_embeddings=True)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    results: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "spec": spec.model_dump(),
        "variants": [],
        "reference_ndcg5": mean_ndcg(work.eval_set, lambda q, items: reference(items) @ reference([q])[0]),
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
        served_dir = options.work_dir / "repository"
        # The response cache would answer repeated texts without running the model: off for the benchmark.
        bench_spec = spec.model_copy(update={"serving": spec.serving.model_copy(update={"response_cache": False})})
        build_repository(bench_spec, served_dir, options.spec_dir, console)
        runner_path = _served_model_file(served_dir, served_encoder, spec)
        # INT8 kernels scale differently with threads than fp32 ones: both are measured, the better one counts.
        for threads in (1, 2):
            runner = load_runner(served_encoder.runtime, runner_path, threads=threads)

            def in_process_embed(texts: list[str], runner=runner) -> np.ndarray:
                batch = tokenizer.encode(texts)
                return run_by_length(runner, batch.input_ids, batch.attention_mask)

            contender = f"in-process served variant ({threads} thread{'s' if threads > 1 else ''})"
            measurements += _in_process(contender, in_process_embed, work, options.duration_s)
        progress.advance(task)

        points = [(p, c) for p in options.protocols for c in options.concurrency]
        task = progress.add_task("served", total=len(points))
        server = start_bench_server(served_dir, options.work_dir)
        try:
            for protocol, concurrency in points:
                progress.update(task, description=f"served {protocol} c={concurrency}")
                measurements += _served(server, protocol, concurrency, work, options.duration_s)
                progress.advance(task)
            results["server_rss_mb"] = server_rss_mb(server.pid)
        finally:
            server.stop()
        results["tuning"] = tune(options, work, console, progress) if options.tune else []
    results["measurements"] = [m.row() for m in measurements]
    results["served_variant"] = _served_variant_name(served_encoder)
    results["checks"] = done_checks(results)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    (options.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, options.out_dir)
    return results


def _served_model_file(repository: Path, encoder, spec: PipelineSpec) -> Path:
    from ecomserve.contract import EMBEDDER
    from ecomserve.repository.configs import encoder_model

    folder = (
        repository / EMBEDDER / "1" / encoder.name
        if spec.serving.layout == "fused"
        else repository / encoder_model(encoder) / "1"
    )
    return folder / MODEL_FILES[encoder.runtime]


def _served_variant_name(encoder) -> str:
    for name, changes in variant_lib.VARIANTS.items():
        spec = variant_lib.variant_spec(encoder, changes)
        if not changes.get("dynamic_int8") and spec == encoder:
            return name
    return "custom"


def _find(rows: list[dict], **match) -> dict:
    return next(r for r in rows if all(r[k] == v for k, v in match.items()))


def done_checks(results: dict) -> dict:
    """The issue's bars, computed from this run's numbers."""
    rows = results["measurements"]
    torch_query = _find(rows, contender="pytorch eager", workload="query embed")["throughput_items"]
    torch_batch = _find(rows, contender="pytorch eager", workload="batch embed 32")["throughput_items"]
    served_query = _find(rows, contender="served", workload="query embed", protocol="grpc", concurrency=16)
    served_batch = max(
        r["throughput_items"] for r in rows if r["contender"] == "served" and r["workload"] == "batch embed 32"
    )
    in_process_rank = min(
        r["p50_ms"] for r in rows if r["contender"].startswith("in-process") and r["workload"] == "rank 1+100"
    )
    served_rank = _find(rows, contender="served", workload="rank 1+100", protocol="grpc", concurrency=1)["p50_ms"]
    variants = {v["name"]: v for v in results["variants"]}
    served = variants.get(results["served_variant"], {})
    return {
        "served_query_c16_vs_torch_b1": served_query["throughput_items"] / torch_query,
        "served_batch32_vs_torch_b32": served_batch / torch_batch,
        "served_rank_p50_vs_in_process": served_rank / in_process_rank,
        "served_variant_ndcg5": served.get("ndcg5"),
        "pytorch_fp32_ndcg5": results["reference_ndcg5"],
    }
