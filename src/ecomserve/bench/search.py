"""`ecomserve bench --workload search`: the catalog index backends at catalog scale.

Per scale: a synthetic catalog grown from the shipped titles, embedded by the served release (up to
EMBED_MAX items; beyond that, noisy copies of the embedded vectors), then faiss exact, faiss HNSW at several
efSearch values, and Milvus Lite (smallest scale only). Each configuration gets its build time and memory,
closed-loop QPS and latency with CONCURRENCY threads sending one real query each, and recall@10 against exact
search on the same vectors. The load generator runs in this process, so the QPS includes its Python overhead,
as the `search` model's calls do."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ecomserve.bench.load import measure
from ecomserve.bench.report import plt, write_csv
from ecomserve.index.backends import FaissIndex, MilvusIndex, VectorIndex, start_milvus_lite
from ecomserve.index.ops import EMBED_BATCH
from ecomserve.paths import corpus_lines
from ecomserve.spec import FaissSpec, MilvusSpec, PipelineSpec

K = 10
CONCURRENCY = 16
EF_SWEEP = (32, 64, 128, 256)
MAX_SCALE = 1_000_000
EMBED_MAX = 100_000  # larger catalogs take too long to embed on 2 cores: their vectors are synthetic
NOISE_SIGMA = 0.01  # per component: a noisy copy keeps cosine ≈ 0.98 to its source vector at dim 384
ADD_CHUNK = 20_000  # rows per upsert: progress steps, and bounded temporaries at 1M rows

# Attribute words for synthetic titles; the brands are invented so no real product is implied.
COLOURS = ("Black", "White", "Navy", "Red", "Forest Green", "Grey", "Beige", "Sky Blue", "Pink", "Olive")
COLOURS += ("Burgundy", "Charcoal", "Mustard", "Teal", "Lavender", "Sand")
SIZES = ("XS", "S", "M", "L", "XL", "XXL", "Small", "Medium", "Large", "One Size")
MATERIALS = ("Cotton", "Stainless Steel", "Bamboo", "Silicone", "Leather", "Recycled Plastic", "Oak", "Linen")
MATERIALS += ("Aluminium", "Wool", "Glass", "Ceramic")
BRANDS = ("Norvik", "Alderlane", "Quillon", "Brightmoor", "Tessaro", "Kelvra", "Ombrie", "Fenwick & Hale")
BRANDS += ("Lumora", "Paxton Goods", "Verdant Co.", "Haldor", "Ziva", "Corvell", "Sunnet", "Marlowe Home")
BRANDS += ("Trekka", "Ivoria", "Bellhaven", "Rusk & Co.", "Nordley", "Calyx", "Ondine", "Vantor")
PACKS = (2, 3, 4, 5, 6, 8, 10, 12, 24)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic catalog


def shipped_titles() -> list[str]:
    return corpus_lines("titles.txt")


def shipped_queries() -> list[str]:
    return corpus_lines("queries.txt")


def synthetic_titles(base: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """n distinct titles: a brand, a shipped title, and optional colour, material, size and pack count.
    One seeded stream draws them in order, so the first m titles are the same for every n ≥ m: a smaller
    scale is a prefix of a larger one, and cached vectors of one serve the other."""
    rng = random.Random(seed)
    seen: set[str] = set()
    titles: list[str] = []
    while len(titles) < n:
        title = _compose(rng, base)
        if title not in seen:
            seen.add(title)
            titles.append(title)
    return titles


def _compose(rng: random.Random, base: Sequence[str]) -> str:
    parts = [f"{rng.choice(BRANDS)} {rng.choice(base)}"]
    # Each attribute appears half the time, so titles vary in length as real listings do.
    if rng.random() < 0.5:
        parts.append(rng.choice(COLOURS))
    if rng.random() < 0.5:
        parts.append(rng.choice(MATERIALS))
    if rng.random() < 0.5:
        parts.append(f"Size {rng.choice(SIZES)}")
    if rng.random() < 0.5:
        parts.append(f"Pack of {rng.choice(PACKS)}")
    return ", ".join(parts)


def item_ids(n: int) -> list[str]:
    return [f"sku-{row}" for row in range(n)]


def expand_vectors(real: np.ndarray, n: int, sigma: float = NOISE_SIGMA, seed: int = 0) -> np.ndarray:
    """n unit vectors: the real ones first, then copies of them (cycling) with gaussian noise, re-normalised."""
    out = np.empty((n, real.shape[1]), np.float32)
    kept = min(n, len(real))
    out[:kept] = real[:kept]
    rng = np.random.default_rng(seed)
    for start in range(kept, n, ADD_CHUNK):  # chunked: the noise for 1M × 384 would be another 1.5 GB
        stop = min(n, start + ADD_CHUNK)
        rows = real[np.arange(start, stop) % len(real)]
        noisy = rows + rng.standard_normal(rows.shape, dtype=np.float32) * np.float32(sigma)
        out[start:stop] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Ground truth and recall


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 100_000) -> np.ndarray:
    """Rows of the k best inner products per query, best first, by brute force in numpy: an answer that owes
    nothing to faiss, so faiss exact is checked too. Chunked so 1M rows never make a [queries, 1M] matrix."""
    k = min(k, len(vectors))
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_rows = np.empty((len(queries), 0), np.int64)
    for start in range(0, len(vectors), chunk):
        scores = queries @ np.asarray(vectors[start : start + chunk], np.float32).T
        top = min(k, scores.shape[1])
        part = np.argpartition(-scores, top - 1, axis=1)[:, :top]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, 1)], axis=1)
        best_rows = np.concatenate([best_rows, part + start], axis=1)
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores, best_rows = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_rows, keep, 1)
    return best_rows


def recall_at_k(found: Sequence[Sequence[str]], truth: Sequence[Sequence[str]], k: int = K) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / |truth[:k]| (a catalog smaller than k caps the bar)."""
    if len(found) != len(truth):
        raise ValueError(f"{len(found)} result lists for {len(truth)} queries")
    shares = [len(set(f[:k]) & set(t[:k])) / len(t[:k]) for f, t in zip(found, truth) if len(t[:k])]
    return float(np.mean(shares)) if shares else float("nan")


def _index_recall(index: VectorIndex, queries: np.ndarray, truth: list[list[str]]) -> float:
    found = []
    for start in range(0, len(queries), 100):  # bounded requests: Milvus takes the batch as one gRPC message
        found += [[item for item, _ in hits] for hits in index.search(queries[start : start + 100], K)]
    return recall_at_k(found, truth, K)


# ---------------------------------------------------------------------------------------------------------------
# Vectors: the served release's embeddings, cached on disk


@dataclass(frozen=True)
class Embedder:
    embed: Callable[[list[str]], np.ndarray]
    key: str  # names the cache files, so vectors of another model or catalog are never reused


def bench_embedder(spec: PipelineSpec, spec_dir: Path, work_dir: Path, console: Console) -> Embedder:
    """The live release of `work_dir/repository`, the folder and spec `run_bench` builds; built here only when
    missing or built from other encoders (settings that do not change the vectors, like `search`, are ignored)."""
    from ecomserve.repository.builder import build_repository, built_spec, is_built
    from ecomserve.repository.inprocess import release_embedder
    from ecomserve.repository.releases import live_release

    repository = work_dir / "repository"
    bench_spec = spec.model_copy(update={"serving": spec.serving.model_copy(update={"response_cache": False})})
    if not is_built(repository) or _embedding_fields(built_spec(repository)) != _embedding_fields(bench_spec):
        console.print(f"building {repository} for the catalog embeddings …")
        build_repository(bench_spec, repository, spec_dir, console)
    built, release = built_spec(repository), live_release(repository)
    embed = release_embedder(repository, release, built)
    return Embedder(embed, _repository_key(repository, release, built))


def _embedding_fields(spec: PipelineSpec) -> dict:
    serving = spec.serving
    return {
        "encoders": [e.model_dump() for e in spec.encoders],
        "fusion": spec.fusion.model_dump(),
        "serving": [serving.target, serving.layout, serving.device],
    }


def _repository_key(repository: Path, release: int, spec: PipelineSpec) -> str:
    """A digest of the release's model and tokenizer files: a rebuilt or newly published model is a new key."""
    from ecomserve.repository.builder import encoder_dirs

    digest = hashlib.sha256(json.dumps(_embedding_fields(spec), sort_keys=True).encode())
    folders = {d for e in spec.encoders for d in encoder_dirs(spec.serving.layout, e, repository, str(release))}
    for path in sorted(p for folder in folders for p in folder.rglob("*") if p.is_file()):
        if "__pycache__" not in path.parts:
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                for block in iter(lambda h=handle: h.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:12]


def _catalog_key(embedder: Embedder, seed: int) -> str:
    words = [seed, shipped_titles(), COLOURS, SIZES, MATERIALS, BRANDS, PACKS]
    return embedder.key + "-" + hashlib.sha256(json.dumps(words).encode()).hexdigest()[:8]


def cached_vectors(
    titles: list[str], embedder: Embedder, cache_dir: Path, key: str, progress: Progress | None = None
) -> np.ndarray:
    """Embeddings of `titles` (a prefix-stable synthetic catalog), from `vectors-<key>-<scale>.npy` when there:
    the largest cached scale is reused for its first rows and only the rest is embedded."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    n, target = len(titles), cache_dir / f"vectors-{key}-{len(titles)}.npy"
    cached = sorted(cache_dir.glob(f"vectors-{key}-*.npy"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    larger = [p for p in cached if int(p.stem.rsplit("-", 1)[1]) >= n]
    if larger:
        return np.array(np.load(larger[0], mmap_mode="r")[:n])
    done = np.load(cached[-1]) if cached else np.empty((0, 0), np.float32)
    parts = [done] if len(done) else []
    task = progress.add_task(f"embed {n} titles", total=n, completed=len(done)) if progress else None
    for start in range(len(done), n, EMBED_BATCH):
        parts.append(np.asarray(embedder.embed(titles[start : start + EMBED_BATCH]), np.float32))
        if progress is not None and task is not None:
            progress.advance(task, len(parts[-1]))
    vectors = np.concatenate(parts)
    np.save(target, vectors)
    return vectors


# ---------------------------------------------------------------------------------------------------------------
# Measuring


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
    key = _catalog_key(embedder, options.seed)
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


# ---------------------------------------------------------------------------------------------------------------
# Report


def plot_recall_qps(results: dict, path: Path) -> None:
    rows = results["rows"]
    scales = list(dict.fromkeys(r["scale"] for r in rows))
    figure, axes = plt.subplots(1, len(scales), figsize=(5.5 * len(scales), 4.5), squeeze=False)
    markers = {"faiss flat": "s", "milvus lite": "D"}
    for axis, scale in zip(axes[0], scales):
        here = [r for r in rows if r["scale"] == scale]
        hnsw = [r for r in here if r["ef_search"] is not None]
        if hnsw:  # the efSearch sweep is one trade-off curve: joined, each point labelled with its ef
            axis.plot([r["qps"] for r in hnsw], [r["recall_at_10"] for r in hnsw], color="grey", linewidth=0.8)
        for r in here:
            axis.scatter(r["qps"], r["recall_at_10"], marker=markers.get(r["config"], "o"), label=r["config"])
        vectors = here[0]["vectors"]
        axis.set(xlabel=f"queries / s ({results['concurrency']} threads)", ylabel=f"recall@{K}", xscale="log")
        axis.set_title(f"{scale:,} items ({vectors} vectors)", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def search_markdown(results: dict) -> str:
    lines = [
        f"Catalog search: top-{K}, {results['concurrency']} threads × one query each, {results['duration_s']:g} s "
        f"per point, {results['queries']} embedded shipped queries; recall against exact search on the same vectors.",
        "",
        "| items | vectors | config | build s | RSS growth MB | disk MB | QPS | p50 ms | p95 ms | recall@10 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['scale']:,} | {r['vectors']} | {r['config']} | {_number(r['build_s'])} | "
            f"{_number(r['rss_growth_mb'])} | {_number(r['disk_mb'])} | {_number(r['qps'], 0)} | "
            f"{_number(r['p50_ms'], 2)} | {_number(r['p95_ms'], 2)} | {_number(r['recall_at_10'], 4)} |"
        )
    if any(s["vectors"] == "synthetic" for s in results["scales"]):
        lines += ["", f"synthetic: the first {EMBED_MAX:,} embedded vectors plus copies with gaussian noise "]
        lines[-1] += f"(σ = {NOISE_SIGMA} per component), re-normalised."
    lines += ["", "milvus lite: RSS growth is the Milvus Lite server's; faiss: this process's."]
    return "\n".join(lines) + "\n"


def write_search_report(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "search_results.json").write_text(json.dumps(results, indent=2))
    write_csv(out_dir / "search.csv", results["rows"])
    plot_recall_qps(results, out_dir / "search_recall_qps.png")
    # Beside summary.md, not inside it: the default workload rewrites summary.md on every run.
    (out_dir / "search_summary.md").write_text(search_markdown(results))
