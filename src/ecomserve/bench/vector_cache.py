"""The vectors of `ecomserve bench --workload search`: the served release's embeddings of a synthetic catalog,
cached on disk under a key naming the model files and the catalog, so vectors of another model or catalog are
never reused."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

from ecomserve.bench.catalogs import BRANDS, COLOURS, MATERIALS, PACKS, SIZES, shipped_titles
from ecomserve.index.ops import EMBED_BATCH
from ecomserve.spec import PipelineSpec


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


def catalog_key(embedder: Embedder, seed: int) -> str:
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
