"""`ecomserve index build|upsert|delete`: embed catalog items with the live release and keep the index
and its manifest in step.

A build writes beside the live index (`<index>.building`) and swaps it in whole, so `search` never sees
half an index; an interrupted build resumes from what it already embedded. Upserts and deletes change
the live index in place and bump the manifest version, which `search` watches. One writer at a time
(a lock file refuses a second)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ecomserve.index.backends import open_index
from ecomserve.index.catalog import (
    CatalogError,
    CatalogItem,
    Manifest,
    read_manifest,
    read_titles,
    write_manifest,
    write_titles,
)
from ecomserve.repository.builder import swap_in
from ecomserve.repository.inprocess import release_embedder
from ecomserve.repository.releases import live_release
from ecomserve.spec import PipelineSpec, SearchSpec

EMBED_BATCH = 256
CHECKPOINT_BATCHES = 20  # an interrupted build loses at most this many batches
LOCK = "index.lock"


def index_dir(spec: PipelineSpec, project_dir: Path) -> Path:
    path = Path(_search(spec).index_dir)
    return path if path.is_absolute() else project_dir / path


def backend_spec(search: SearchSpec, release: int) -> SearchSpec:
    """Each release gets its own Milvus collection, so a rebuild never overwrites the one being searched."""
    milvus = search.milvus.model_copy(update={"collection": f"{search.milvus.collection}_r{release}"})
    return search.model_copy(update={"milvus": milvus})


def build_index(
    spec: PipelineSpec, repository: Path, items: list[CatalogItem], target: Path, console: Console
) -> Manifest:
    """Embed every item with the live release and swap the new index in for `target`."""
    search, release = _search(spec), live_release(repository)
    embed = release_embedder(repository, release, spec)
    staging = target.with_name(target.name + ".building")
    resumed = read_manifest(staging)
    if resumed is not None and (resumed.release != release or resumed.backend != search.backend):
        shutil.rmtree(staging)  # left by a build for another release or backend: nothing to resume
        resumed = None
    dim = int(embed(["dimension probe"]).shape[1])
    if resumed is None:
        staging.mkdir(parents=True, exist_ok=True)
        write_manifest(staging, Manifest(search.backend, release, dim, version=0, items=0))
    with _writer(staging):
        index = open_index(backend_spec(search, release), staging, dim)
        titles = read_titles(staging)
        todo = [item for item in _unique(items) if titles.get(item.id) != item.title]
        if resumed is not None:
            console.print(f"resuming {staging}: {len(titles)} items already embedded, {len(todo)} to go")
        _embed_into(index, titles, todo, embed, staging, console)
        stale = set(titles) - {item.id for item in items}
        if stale:
            index.delete(sorted(stale))
            titles = {k: v for k, v in titles.items() if k not in stale}
        _save(index, titles, staging)
        previous = read_manifest(target)
        manifest = Manifest(search.backend, release, dim, (previous.version if previous else 0) + 1, len(index))
        write_manifest(staging, manifest)
    swap_in(staging, target)
    return manifest


def upsert_items(
    spec: PipelineSpec, repository: Path, items: list[CatalogItem], target: Path, console: Console
) -> Manifest:
    manifest = _live_manifest(target)
    embed = release_embedder(repository, manifest.release, spec)
    with _writer(target):
        index = open_index(backend_spec(_search(spec), manifest.release), target, manifest.dim)
        titles = read_titles(target)
        _embed_into(index, titles, list(_unique(items)), embed, target, console)
        return _commit(index, titles, target, manifest)


def delete_items(spec: PipelineSpec, ids: list[str], target: Path) -> tuple[Manifest, int]:
    manifest = _live_manifest(target)
    with _writer(target):
        index = open_index(backend_spec(_search(spec), manifest.release), target, manifest.dim)
        removed = index.delete(ids)
        gone = set(ids)
        titles = {k: v for k, v in read_titles(target).items() if k not in gone}
        return _commit(index, titles, target, manifest), removed


def _embed_into(
    index, titles: dict[str, str], items: list[CatalogItem], embed: Callable, folder: Path, console
) -> None:
    columns = (TextColumn("embed items"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("embed", total=len(items))
        for number, start in enumerate(range(0, len(items), EMBED_BATCH), start=1):
            batch = items[start : start + EMBED_BATCH]
            index.upsert([item.id for item in batch], np.asarray(embed([item.title for item in batch]), np.float32))
            titles.update((item.id, item.title) for item in batch)
            if number % CHECKPOINT_BATCHES == 0:
                _save(index, titles, folder)
            progress.advance(task, len(batch))


def _commit(index, titles: dict[str, str], target: Path, manifest: Manifest) -> Manifest:
    _save(index, titles, target)
    updated = Manifest(manifest.backend, manifest.release, manifest.dim, manifest.version + 1, len(index))
    write_manifest(target, updated)  # last: `search` reloads when it sees the new version
    return updated


def _save(index, titles: dict[str, str], folder: Path) -> None:
    # Vectors before titles: `search` returns only ids that have a title, so a crash between the two
    # writes leaves a new item unseen until the next write, never a deleted one shown.
    index.save(folder)
    write_titles(folder, titles)


def _live_manifest(target: Path) -> Manifest:
    manifest = read_manifest(target)
    if manifest is None:
        raise CatalogError(f"no index at {target}: run `ecomserve index build CATALOG` first")
    return manifest


def _search(spec: PipelineSpec) -> SearchSpec:
    if spec.search is None:
        raise CatalogError("the spec has no `search:` section: add one to build a catalog index")
    return spec.search


def _unique(items: list[CatalogItem]) -> Iterator[CatalogItem]:
    """The last occurrence of each id wins, as a catalog feed would mean it."""
    yield from {item.id: item for item in items}.values()


@contextmanager
def _writer(folder: Path):
    lock = folder / LOCK
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise CatalogError(f"{lock} exists: another index writer is running (remove it if none is)") from None
    os.close(descriptor)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
