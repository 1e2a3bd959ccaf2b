"""`ecomserve bench --workload search`: the catalog index backends at catalog scale.

Per scale: a synthetic catalog grown from the shipped titles, embedded by the served release (up to
EMBED_MAX items; beyond that, noisy copies of the embedded vectors), then faiss exact, faiss HNSW at several
efSearch values, and Milvus Lite (smallest scale only). Each configuration gets its build time and memory,
closed-loop QPS and latency with CONCURRENCY threads sending one real query each, and recall@10 against exact
search on the same vectors. The load generator runs in this process, so the QPS includes its Python overhead,
as the `search` model's calls do.

The catalogs are made in `catalogs.py`, embedded and cached in `vector_cache.py`, reported by `search_report.py`."""

from __future__ import annotations

import gc
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ecomserve.bench.catalogs import (
    ADD_CHUNK,
    EMBED_MAX,
    NOISE_SIGMA,
    K,
    exact_neighbours,
    expand_vectors,
    item_ids,
    recall_at_k,
    shipped_queries,
    shipped_titles,
    synthetic_titles,
)
from ecomserve.bench.load import measure
from ecomserve.bench.search_report import write_search_report
from ecomserve.bench.vector_cache import Embedder, bench_embedder, cached_vectors, catalog_key
from ecomserve.index.faiss_index import FaissIndex
from ecomserve.index.milvus_index import MilvusIndex
from ecomserve.index.milvus_lite import start_milvus_lite
from ecomserve.index.vector_index import VectorIndex
from ecomserve.spec import FaissSpec, MilvusSpec, PipelineSpec

CONCURRENCY = 16
EF_SWEEP = (32, 64, 128, 256)
MAX_SCALE = 1_000_000


def _index_recall(index: VectorIndex, queries: np.ndarray, truth: list[list[str]]) -> float:
    found = []
    for start in range(0, len(queries), 100):  # bounded requests: Milvus takes the batch as one gRPC message
        found += [[item for item, _ in hits] for hits in index.search(queries[start : start + 100], K)]
    return recall_at_k(found, truth, K)


@dataclass
class SearchBenchOptions:
    out_dir: Path = Path("bench_results")
    scales: list[int] = field(default_factory=lambda: [10_000, 100_000])
    duration_s: float = 5.0
    concurrency: int = CONCURRENCY
    faiss: FaissSpec = field(default_factory=FaissSpec)  # hnsw_m and ef_construction of the spec
    ef_search: list[int] = field(default_factory=lambda: list(EF_SWEEP))
    milvus: bool = True
    seed: int = 0


def rss_mb(pid: int | None = None) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def _disk_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


@dataclass
class _Run:
    """What every measured point of one run shares."""

    options: SearchBenchOptions
    queries: np.ndarray
    scratch: Path
    progress: Progress
    points: TaskID  # the overall count of measured points


@dataclass
class _Catalog:
    scale: int
    ids: list[str]
    vectors: np.ndarray
    truth: list[list[str]]  # per query, the exact top-K ids


def _fill(index: VectorIndex, catalog: _Catalog, progress: Progress, label: str) -> None:
    task = progress.add_task(label, total=catalog.scale)
    for start in range(0, catalog.scale, ADD_CHUNK):
        index.upsert(catalog.ids[start : start + ADD_CHUNK], catalog.vectors[start : start + ADD_CHUNK])
        progress.advance(task, len(catalog.ids[start : start + ADD_CHUNK]))


def _measure(run: _Run, catalog: _Catalog, name: str, index: VectorIndex, protocol: str) -> dict:
    """Recall@K on every query, then a closed loop: `concurrency` threads, each sending one query vector and
    waiting for its answer, for duration_s."""
    run.progress.update(run.points, description=f"{name}, {catalog.scale} items")
    queries = run.queries

    def make_call(_worker: int) -> Callable[[int], object]:
        return lambda i: index.search(queries[i % len(queries)][None, :], K)

    recall = _index_recall(index, queries, catalog.truth)
    point = measure(name, f"search top-{K}", protocol, run.options.concurrency, make_call, 1, run.options.duration_s)
    run.progress.advance(run.points)
    return {
        "recall_at_10": recall,
        "qps": point.throughput_rps,
        "p50_ms": point.p50_ms,
        "p95_ms": point.p95_ms,
        "p99_ms": point.p99_ms,
        "requests": point.requests,
        "errors": point.errors,
    }


def _row(catalog: _Catalog, config: str, spec: FaissSpec | None = None, ef: int | None = None) -> dict:
    hnsw = spec is not None and ef is not None
    return {
        "scale": catalog.scale,
        "config": config,
        "hnsw_m": spec.hnsw_m if hnsw else None,
        "ef_construction": spec.ef_construction if hnsw else None,
        "ef_search": ef,
    }


def _faiss_rows(run: _Run, catalog: _Catalog) -> list[dict]:
    rows = []
    options, dim = run.options, catalog.vectors.shape[1]
    kinds = {
        "faiss flat": options.faiss.model_copy(update={"exact_below": catalog.scale + 1}),
        "faiss hnsw": options.faiss.model_copy(update={"exact_below": 0}),
    }
    for kind, spec in kinds.items():
        index = FaissIndex(dim, spec)
        gc.collect()  # the previous index's memory is returned first, so it does not hide this one's growth
        before, began = rss_mb(), time.perf_counter()
        _fill(index, catalog, run.progress, f"{kind} build, {catalog.scale} items")
        build = {"build_s": time.perf_counter() - began, "rss_growth_mb": rss_mb() - before}
        # What `ecomserve index build` keeps on disk: the faiss index, the raw vectors and the ids.
        build["disk_mb"] = _disk_mb(index.save(run.scratch / "faiss"))
        shutil.rmtree(run.scratch / "faiss")
        for ef in [None] if index.kind == "flat" else options.ef_search:
            if ef is not None:
                # FaissIndex reads efSearch from its spec on every search: one graph serves the whole sweep.
                index.spec = spec.model_copy(update={"ef_search": ef})
            name = kind if ef is None else f"{kind} ef={ef}"
            rows.append(_row(catalog, name, spec, ef) | build | _measure(run, catalog, name, index, "in-process"))
        del index
    return rows


def _milvus_row(run: _Run, catalog: _Catalog) -> dict:
    """Milvus Lite on a loopback port, as the `search` model reaches a shared Milvus Lite. Its memory is the
    server process's RSS growth while the collection is filled and flushed."""
    db_file = run.scratch / f"milvus-{catalog.scale}.db"
    for stale in run.scratch.glob(f"*milvus-{catalog.scale}.db*"):  # a fresh collection: the build is timed
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    before_start = {child.pid for child in psutil.Process().children()}
    with start_milvus_lite(db_file) as server:
        started = sorted({child.pid for child in psutil.Process().children()} - before_start)
        pid = started[0] if len(started) == 1 else None
        index = MilvusIndex(MilvusSpec(uri=server.uri, collection=f"bench_{catalog.scale}"), catalog.vectors.shape[1])
        before, began = rss_mb(pid) if pid else None, time.perf_counter()
        _fill(index, catalog, run.progress, f"milvus lite build, {catalog.scale} items")
        index.flush()
        build = {"build_s": time.perf_counter() - began}
        build["rss_growth_mb"] = rss_mb(pid) - before if pid and before is not None else None
        build["disk_mb"] = _disk_mb(db_file)
        return _row(catalog, "milvus lite") | build | _measure(run, catalog, "milvus lite", index, "grpc")


def _scale_vectors(
    scale: int, options: SearchBenchOptions, embedder: Embedder, cache_dir: Path, progress: Progress
) -> tuple[np.ndarray, dict]:
    key = catalog_key(embedder, options.seed)
    embedded = min(scale, EMBED_MAX)
    titles = synthetic_titles(shipped_titles(), embedded, options.seed)
    real = cached_vectors(titles, embedder, cache_dir, key, progress)
    if scale <= EMBED_MAX:
        return real, {"vectors": "embedded", "example_titles": titles[:5]}
    info = {"vectors": "synthetic", "from_embedded": embedded, "noise_sigma": NOISE_SIGMA}
    return expand_vectors(real, scale, NOISE_SIGMA, options.seed), info


# Milvus Lite inserts about 140 items/s here (10k: 73 s): it is measured at the smallest scale up to
# this size only; catalogs beyond it belong on a Milvus server, which this machine does not have.
MILVUS_LITE_MAX = 10_000


def run_search_bench(options: SearchBenchOptions, embedder: Embedder, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    scratch = options.out_dir / "search_work"
    scratch.mkdir(parents=True, exist_ok=True)
    scales = sorted(set(options.scales))
    milvus_scale = scales[0] if options.milvus and scales[0] <= MILVUS_LITE_MAX else None
    total_points = len(scales) * (1 + len(options.ef_search)) + (milvus_scale is not None)
    results: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "k": K,
        "concurrency": options.concurrency,
        "duration_s": options.duration_s,
        "faiss": options.faiss.model_dump() | {"ef_search_sweep": options.ef_search},
        "embedder": embedder.key,
        "cpu_count": os.cpu_count(),
        "faiss_version": faiss.__version__,
        "scales": [],
        "rows": [],
    }
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        points = progress.add_task("search bench", total=total_points)
        queries = np.ascontiguousarray(embedder.embed(shipped_queries()), np.float32)
        results["queries"] = len(queries)
        run = _Run(options, queries, scratch, progress, points)
        for scale in scales:
            vectors, info = _scale_vectors(scale, options, embedder, scratch / "vectors", progress)
            results["scales"].append({"scale": scale, "dim": int(vectors.shape[1])} | info)
            ids = item_ids(scale)
            truth = [[ids[row] for row in rows] for rows in exact_neighbours(vectors, queries, K)]
            catalog = _Catalog(scale, ids, vectors, truth)
            rows = _faiss_rows(run, catalog)
            if scale == milvus_scale:
                rows.append(_milvus_row(run, catalog))
            results["rows"] += [row | {"vectors": info["vectors"]} for row in rows]
            del vectors, catalog  # a 1M catalog is 1.5 GB: gone before the next scale's
    write_search_report(results, options.out_dir)
    return results


def bench_search(
    spec: PipelineSpec,
    spec_dir: Path,
    out_dir: Path,
    duration_s: float,
    scales: list[int] | None = None,
    console: Console | None = None,
    work_dir: Path = Path(".ecomserve/bench"),  # BenchOptions.work_dir: the bench repository is shared
) -> dict:
    """The run `ecomserve bench --workload search` makes: the spec's HNSW settings, its encoders' vectors."""
    console = console or Console(stderr=True)
    faiss_spec = spec.search.faiss if spec.search else FaissSpec()
    options = SearchBenchOptions(out_dir=out_dir, duration_s=duration_s, faiss=faiss_spec)
    if scales:
        options.scales = scales
    return run_search_bench(options, bench_embedder(spec, spec_dir, work_dir, console), console)
