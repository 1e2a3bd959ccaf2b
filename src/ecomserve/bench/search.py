"""`ecomserve bench --workload search`: the catalog index backends at catalog scale.

Per scale: a synthetic catalog grown from the shipped titles, embedded by the served release (up to
EMBED_MAX items; beyond that, noisy copies of the embedded vectors), each item with filterable fields
(category, brand, price, in_stock). Then faiss exact and faiss HNSW (at several efSearch values), unfiltered and
under FILTERs matching about 1 %, 10 % and 50 % of the items (HNSW at the spec's efSearch); BM25 alone and hybrid
(BM25 + the faiss index the spec would serve at that scale, fused as the `search` model fuses); and Milvus Lite
(smallest scale only), unfiltered and filtered. Each index gets its build time, memory and size on disk; each
point closed-loop QPS and latency with CONCURRENCY threads sending one real query each, and the dense points
recall@10 against exact search over the same vectors (within the filter: over the matching items only), with a
check that every answer has min(10, matching) items, all matching.

The load generator runs in this process, so the QPS includes its Python overhead, as the `search` model's calls
do. The catalogs are made in `catalogs.py`, embedded and cached in `vector_cache.py`, their filters, answer checks,
BM25 index and hybrid call are in `search_queries.py`, the report in `search_report.py`."""

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
    BENCH_FILTERS,
    EMBED_MAX,
    NOISE_SIGMA,
    K,
    catalog_titles,
    exact_neighbours,
    expand_vectors,
    item_fields,
    item_ids,
    shipped_queries,
    shipped_titles,
    synthetic_titles,
)
from ecomserve.bench.load import measure
from ecomserve.bench.search_queries import (
    FilterCase,
    answer_quality,
    build_lexical,
    disk_mb,
    filter_cases,
    hybrid_call,
    lexical_call,
    rss_mb,
    unfiltered_case,
)
from ecomserve.bench.search_report import write_search_report
from ecomserve.bench.vector_cache import Embedder, bench_embedder, cached_vectors, catalog_key
from ecomserve.index.faiss_index import FaissIndex
from ecomserve.index.lexical import LexicalIndex
from ecomserve.index.milvus_index import MilvusIndex
from ecomserve.index.milvus_lite import start_milvus_lite
from ecomserve.index.vector_index import VectorIndex
from ecomserve.spec import FaissSpec, MilvusSpec, PipelineSpec, SearchFusionSpec

CONCURRENCY = 16
EF_SWEEP = (32, 64, 128, 256)
MAX_SCALE = 1_000_000


@dataclass
class SearchBenchOptions:
    out_dir: Path = Path("bench_results")
    scales: list[int] = field(default_factory=lambda: [10_000, 100_000])
    duration_s: float = 5.0
    concurrency: int = CONCURRENCY
    faiss: FaissSpec = field(default_factory=FaissSpec)  # the spec's HNSW settings, efSearch and exact_below
    fusion: SearchFusionSpec = field(default_factory=SearchFusionSpec)  # the hybrid points' candidates and weights
    ef_search: list[int] = field(default_factory=lambda: list(EF_SWEEP))
    milvus: bool = True
    seed: int = 0


@dataclass
class _Run:
    """What every measured point of one run shares."""

    options: SearchBenchOptions
    queries: np.ndarray  # the shipped queries' vectors
    texts: list[str]  # the shipped queries themselves, for BM25
    scratch: Path
    progress: Progress
    points: TaskID  # the overall count of measured points


@dataclass
class _Catalog:
    scale: int
    ids: list[str]
    titles: list[str]
    fields: list[dict]  # each item's filterable fields, as `ecomserve index build` gives the index
    vectors: np.ndarray
    cases: list[FilterCase]  # no filter first, then one per BENCH_FILTERS entry


def _points_per_scale(options: SearchBenchOptions) -> int:
    """faiss flat and HNSW (per efSearch) unfiltered, each under every filter, BM25 alone, hybrid."""
    return 1 + len(options.ef_search) + 2 * len(BENCH_FILTERS) + 2


def _fill(index: VectorIndex, catalog: _Catalog, progress: Progress, label: str) -> None:
    task = progress.add_task(label, total=catalog.scale)
    for start in range(0, catalog.scale, ADD_CHUNK):
        stop = start + ADD_CHUNK
        index.upsert(catalog.ids[start:stop], catalog.vectors[start:stop], catalog.fields[start:stop])
        progress.advance(task, len(catalog.ids[start:stop]))


def _measure(run: _Run, catalog: _Catalog, name: str, call: Callable[[int], object], protocol: str) -> dict:
    """A closed loop: `concurrency` threads, each sending one query (call(i): the i-th shipped query, cycling)
    and waiting for its answer, for duration_s."""
    run.progress.update(run.points, description=f"{name}, {catalog.scale} items")
    options = run.options
    point = measure(name, f"search top-{K}", protocol, options.concurrency, lambda _w: call, 1, options.duration_s)
    run.progress.advance(run.points)
    return {
        "qps": point.throughput_rps,
        "p50_ms": point.p50_ms,
        "p95_ms": point.p95_ms,
        "p99_ms": point.p99_ms,
        "requests": point.requests,
        "errors": point.errors,
    }


def _row(
    catalog: _Catalog,
    config: str,
    spec: FaissSpec | None = None,
    ef: int | None = None,
    case: FilterCase | None = None,
    mode: str = "dense",
) -> dict:
    """A row's description; the build and answer-check columns are filled by the points that have them."""
    hnsw = spec is not None and ef is not None
    where = case if case is not None and case.where is not None else None
    return {
        "scale": catalog.scale,
        "mode": mode,
        "config": config,
        "filter": where.text if where else None,
        "filter_target": where.label if where else None,
        "filter_share": where.share if where else None,
        "hnsw_m": spec.hnsw_m if hnsw else None,
        "ef_construction": spec.ef_construction if hnsw else None,
        "ef_search": ef,
        "build_s": None,
        "rss_growth_mb": None,
        "disk_mb": None,
        "recall_at_10": None,
        "short_results": None,
        "filter_violations": None,
    }


def _dense_point(run: _Run, catalog: _Catalog, index: VectorIndex, case: FilterCase, row: dict, protocol: str) -> dict:
    """The answer check on every query (untimed; it also makes the index select the filter's rows, as a served
    filter's first request does), then the closed loop under the same filter."""
    quality = answer_quality(index, run.queries, case)
    queries, where = run.queries, case.where

    def call(i: int) -> object:
        return index.search(queries[i % len(queries)][None, :], K, where)

    name = row["config"] + (f", filter {case.label}" if where is not None else "")
    return row | quality | _measure(run, catalog, name, call, protocol)


def _faiss_build(run: _Run, catalog: _Catalog, kind: str, spec: FaissSpec) -> tuple[FaissIndex, dict]:
    index = FaissIndex(catalog.vectors.shape[1], spec)
    gc.collect()  # the previous index's memory is returned first, so it does not hide this one's growth
    before, began = rss_mb(), time.perf_counter()
    _fill(index, catalog, run.progress, f"{kind} build, {catalog.scale} items")
    build = {"build_s": time.perf_counter() - began, "rss_growth_mb": rss_mb() - before}
    # What `ecomserve index build` keeps on disk: the faiss index, the raw vectors, the ids and the fields.
    build["disk_mb"] = disk_mb(index.save(run.scratch / "faiss"))
    shutil.rmtree(run.scratch / "faiss")
    return index, build


def _faiss_rows(run: _Run, catalog: _Catalog, lexical: LexicalIndex) -> list[dict]:
    """Per kind: unfiltered (HNSW across the efSearch sweep), then each filter at the spec's efSearch; the hybrid
    point on the kind the spec serves at this scale (HNSW from exact_below items)."""
    rows = []
    options = run.options
    unfiltered, *filtered = catalog.cases
    kinds = {
        "faiss flat": options.faiss.model_copy(update={"exact_below": catalog.scale + 1}),
        "faiss hnsw": options.faiss.model_copy(update={"exact_below": 0}),
    }
    served = "faiss hnsw" if catalog.scale >= options.faiss.exact_below else "faiss flat"
    for kind, spec in kinds.items():
        index, build = _faiss_build(run, catalog, kind, spec)
        sweep = [None] if index.kind == "flat" else options.ef_search
        for ef in sweep:
            # FaissIndex reads efSearch from its spec on every search: one graph serves the whole sweep.
            index.spec = spec.model_copy(update={"ef_search": ef}) if ef is not None else spec
            row = _row(catalog, kind if ef is None else f"{kind} ef={ef}", spec, ef) | build
            rows.append(_dense_point(run, catalog, index, unfiltered, row, "in-process"))
        index.spec = spec  # the spec's own efSearch for the filtered and hybrid points
        ef = None if index.kind == "flat" else spec.ef_search
        name = kind if ef is None else f"{kind} ef={ef}"
        for case in filtered:
            rows.append(
                _dense_point(run, catalog, index, case, _row(catalog, name, spec, ef, case) | build, "in-process")
            )
        if kind == served:
            rows.append(_hybrid_row(run, catalog, lexical, index, _row(catalog, f"bm25 + {name}", spec, ef)))
        del index
    return rows


def _hybrid_row(run: _Run, catalog: _Catalog, lexical: LexicalIndex, index: VectorIndex, row: dict) -> dict:
    fusion = run.options.fusion
    row |= {"mode": "hybrid", "config": f"{row['config']} ({fusion.mode})"}
    call = hybrid_call(lexical, index, fusion, run.texts, run.queries)
    return row | _measure(run, catalog, row["config"], call, "in-process")


def _lexical_row(run: _Run, catalog: _Catalog, lexical: LexicalIndex, build: dict) -> dict:
    """BM25 alone, with its index's build: the `search` model's lexical mode."""
    row = _row(catalog, "bm25", mode="lexical") | build
    return row | _measure(run, catalog, "bm25", lexical_call(lexical, run.texts), "in-process")


def _milvus_rows(run: _Run, catalog: _Catalog) -> list[dict]:
    """Milvus Lite on a loopback port, as the `search` model reaches a shared Milvus Lite, unfiltered and under
    each filter (a boolean expression over the collection's JSON field of catalog fields). Its memory is the
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
        build["disk_mb"] = disk_mb(db_file)
        return [
            _dense_point(run, catalog, index, case, _row(catalog, "milvus lite", case=case) | build, "grpc")
            for case in catalog.cases
        ]


def _scale_vectors(
    scale: int, options: SearchBenchOptions, embedder: Embedder, cache_dir: Path, progress: Progress
) -> tuple[np.ndarray, list[str], dict]:
    """The scale's vectors, the titles of the embedded ones (up to EMBED_MAX), and how the vectors were made."""
    key = catalog_key(embedder, options.seed)
    embedded = min(scale, EMBED_MAX)
    titles = synthetic_titles(shipped_titles(), embedded, options.seed)
    real = cached_vectors(titles, embedder, cache_dir, key, progress)
    if scale <= EMBED_MAX:
        return real, titles, {"vectors": "embedded", "example_titles": titles[:5]}
    info = {"vectors": "synthetic", "from_embedded": embedded, "noise_sigma": NOISE_SIGMA}
    return expand_vectors(real, scale, NOISE_SIGMA, options.seed), titles, info


def _catalog(run: _Run, scale: int, vectors: np.ndarray, embedded_titles: list[str]) -> _Catalog:
    ids = item_ids(scale)
    titles = catalog_titles(embedded_titles, scale)
    fields = item_fields(titles, run.options.seed)
    truth = [[ids[row] for row in rows] for rows in exact_neighbours(vectors, run.queries, K)]
    cases = [unfiltered_case(ids, truth), *filter_cases(ids, fields, vectors, run.queries)]
    return _Catalog(scale, ids, titles, fields, vectors, cases)


# Milvus Lite inserts about 140 items/s here (10k: 73 s): it is measured at the smallest scale up to
# this size only; catalogs beyond it belong on a Milvus server, which this machine does not have.
MILVUS_LITE_MAX = 10_000


def _scale_rows(run: _Run, catalog: _Catalog, milvus: bool) -> tuple[list[dict], dict]:
    """Every point of one scale, and the BM25 build (also in the bm25 row)."""
    lexical, lexical_build = build_lexical(catalog.ids, catalog.titles, catalog.fields, run.scratch)
    rows = _faiss_rows(run, catalog, lexical)
    rows.append(_lexical_row(run, catalog, lexical, lexical_build))
    if milvus:
        rows += _milvus_rows(run, catalog)
    return rows, lexical_build


def run_search_bench(options: SearchBenchOptions, embedder: Embedder, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    scratch = options.out_dir / "search_work"
    scratch.mkdir(parents=True, exist_ok=True)
    scales = sorted(set(options.scales))
    milvus_scale = scales[0] if options.milvus and scales[0] <= MILVUS_LITE_MAX else None
    milvus_points = 1 + len(BENCH_FILTERS) if milvus_scale is not None else 0
    total_points = len(scales) * _points_per_scale(options) + milvus_points
    results: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "k": K,
        "concurrency": options.concurrency,
        "duration_s": options.duration_s,
        "faiss": options.faiss.model_dump() | {"ef_search_sweep": options.ef_search},
        "fusion": options.fusion.model_dump(),
        "filters": BENCH_FILTERS,
        "embedder": embedder.key,
        "cpu_count": os.cpu_count(),
        "faiss_version": faiss.__version__,
        "scales": [],
        "rows": [],
    }
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        points = progress.add_task("search bench", total=total_points)
        texts = shipped_queries()
        queries = np.ascontiguousarray(embedder.embed(texts), np.float32)
        results["queries"] = len(queries)
        run = _Run(options, queries, texts, scratch, progress, points)
        for scale in scales:
            vectors, titles, info = _scale_vectors(scale, options, embedder, scratch / "vectors", progress)
            catalog = _catalog(run, scale, vectors, titles)
            rows, lexical_build = _scale_rows(run, catalog, scale == milvus_scale)
            shares = {case.label: case.share for case in catalog.cases if case.where is not None}
            described = {"scale": scale, "dim": int(vectors.shape[1]), "filter_shares": shares, "bm25": lexical_build}
            results["scales"].append(described | info)
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
    """The run `ecomserve bench --workload search` makes: the spec's HNSW and fusion settings, its encoders'
    vectors."""
    console = console or Console(stderr=True)
    faiss_spec = spec.search.faiss if spec.search else FaissSpec()
    fusion = spec.search.fusion if spec.search else SearchFusionSpec()
    options = SearchBenchOptions(out_dir=out_dir, duration_s=duration_s, faiss=faiss_spec, fusion=fusion)
    if scales:
        options.scales = scales
    return run_search_bench(options, bench_embedder(spec, spec_dir, work_dir, console), console)
