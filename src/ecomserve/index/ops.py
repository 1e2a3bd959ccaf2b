"""`ecomserve index build|upsert|delete`: embed catalog items with the live release and keep the index
and its manifest in step.

Every write stages a complete new version folder inside the index folder, then replaces the manifest to
name it (`catalog.py`): that replacement is the one commit point, so a reader sees the old version or the
new one, and a writer killed at any moment leaves the old one live (the next writer removes what it left).
A build also checkpoints into `<index>.building`, laid out the same way, and an interrupted build resumes
from there. Writers exclude each other with an flock on `<index>.lock`: the kernel drops it when its holder
dies, so it never goes stale; a writer that finds it held waits `wait_s`, then gives up naming the holder.

Milvus keeps the vectors (and the items' filterable fields) in its own server, outside the version folder:
they change as a write goes (`search` shows only ids the committed titles have, so a new item appears only
with the new version, but a changed or deleted one changes early), and a killed write leaves the vectors it
sent."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import IO

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ecomserve.index.catalog import (
    WRITER_WAIT_S,
    CatalogError,
    CatalogItem,
    Manifest,
    read_items,
    read_manifest,
    read_titles,
    write_items,
    write_manifest,
    write_titles,
)
from ecomserve.index.lexical import LexicalIndex, item_text
from ecomserve.index.loading import backend_spec, open_index, open_version
from ecomserve.index.vector_index import VectorIndex
from ecomserve.prompts import PASSAGE_PROMPT, with_prompt
from ecomserve.repository.inprocess import release_embedder
from ecomserve.repository.releases import live_release
from ecomserve.spec import PipelineSpec, SearchSpec

EMBED_BATCH = 256
CHECKPOINT_BATCHES = 20  # an interrupted build loses at most this many batches
LOCK_POLL_S = 0.2
# Version folders (`v<version>-<random>`), staged (`.<name>.staging`) or on their way out (`.<name>.old`).
VERSION_FOLDER = re.compile(r"\.?v\d+-[0-9a-f]{8}(\.staging|\.old)?")
# A full disk, a quota, or a file-size limit (RLIMIT_FSIZE).
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def index_dir(spec: PipelineSpec, project_dir: Path) -> Path:
    path = Path(_search(spec).index_dir)
    return path if path.is_absolute() else project_dir / path


def build_index(
    spec: PipelineSpec,
    repository: Path,
    items: list[CatalogItem],
    target: Path,
    console: Console,
    wait_s: float = WRITER_WAIT_S,
) -> Manifest:
    """Embed every item with the live release and commit the result as the next version of `target`."""
    search = _search(spec)
    with _writer(target, "build", wait_s):
        release, prompt = live_release(repository), spec.prompts.get(PASSAGE_PROMPT, "")
        embed = _passage_embedder(repository, release, spec)
        dim = int(embed(["dimension probe"]).shape[1])
        staging = target.with_name(target.name + ".building")
        resumed = _resumable(staging, search.backend, release, dim, prompt)
        if resumed is None:
            index = open_index(backend_spec(search, release), staging, dim, relative_to=target.parent)
            titles, extras = {}, {}
        else:
            index, titles = open_version(search, staging, resumed), read_titles(staging, resumed)
            extras = read_items(staging, resumed)
        todo = [
            item
            for item in _unique(items)
            if titles.get(item.id) != item.title or extras.get(item.id, {}) != item.extras()
        ]
        if resumed is not None:
            console.print(f"resuming {staging}: {len(titles)} items already embedded, {len(todo)} to go")
        # _commit fills in the rest
        base = Manifest(search.backend, release, dim, version=0, items=0, data="", passage_prompt=prompt)
        _embed_into(
            index,
            titles,
            extras,
            todo,
            embed,
            console,
            checkpoint=lambda: _commit(staging, index, titles, extras, base, 0, lexical=False),
        )
        # From the index, not the titles: a Milvus collection may hold items of an earlier build of this release.
        stale = set(index.ids()) - {item.id for item in items}
        if stale:
            index.delete(sorted(stale))
            titles = {k: v for k, v in titles.items() if k not in stale}
            extras = {k: v for k, v in extras.items() if k not in stale}
        previous = read_manifest(target)
        manifest = _commit(target, index, titles, extras, base, (previous.version if previous else 0) + 1)
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def upsert_items(
    spec: PipelineSpec,
    repository: Path,
    items: list[CatalogItem],
    target: Path,
    console: Console,
    wait_s: float = WRITER_WAIT_S,
) -> Manifest:
    """Add or replace items, embedded by the index's own release."""
    search = _search(spec)
    with _writer(target, "upsert", wait_s):
        live = _live_manifest(target)
        if live.passage_prompt != spec.prompts.get(PASSAGE_PROMPT, ""):
            raise CatalogError(
                f"{target} was embedded with the passage prompt {live.passage_prompt!r} and the spec's is "
                f"{spec.prompts.get(PASSAGE_PROMPT, '')!r}: rebuild it with `ecomserve index build CATALOG`"
            )
        embed = _passage_embedder(repository, live.release, spec)
        index, titles = open_version(search, target, live), read_titles(target, live)
        extras = read_items(target, live)
        _embed_into(index, titles, extras, list(_unique(items)), embed, console)
        return _commit(target, index, titles, extras, live, live.version + 1)


def delete_items(
    spec: PipelineSpec, ids: list[str], target: Path, wait_s: float = WRITER_WAIT_S
) -> tuple[Manifest, int]:
    search = _search(spec)
    with _writer(target, "delete", wait_s):
        live = _live_manifest(target)
        index = open_version(search, target, live)
        removed = index.delete(ids)
        gone = set(ids)
        titles = {k: v for k, v in read_titles(target, live).items() if k not in gone}
        extras = {k: v for k, v in read_items(target, live).items() if k not in gone}
        return _commit(target, index, titles, extras, live, live.version + 1), removed


def _passage_embedder(repository: Path, release: int, spec: PipelineSpec) -> Callable[[list[str]], np.ndarray]:
    """Titles are passages: embedded with the passage prompt, as `rank` embeds its candidates."""
    embed = release_embedder(repository, release, spec)
    return lambda titles: embed(with_prompt(spec.prompts, PASSAGE_PROMPT, titles))


def _resumable(staging: Path, backend: str, release: int, dim: int, prompt: str) -> Manifest | None:
    """The last checkpoint of an interrupted build of this release, backend and passage prompt; anything else
    there is removed."""
    try:
        resumed = read_manifest(staging)
    except CatalogError:  # left by an earlier ecomserve: nothing to resume
        resumed = None
    wanted = (backend, release, dim, prompt)
    if resumed is not None and (resumed.backend, resumed.release, resumed.dim, resumed.passage_prompt) == wanted:
        return resumed
    shutil.rmtree(staging, ignore_errors=True)
    return None


def _embed_into(
    index: VectorIndex,
    titles: dict[str, str],
    extras: dict[str, dict],
    items: list[CatalogItem],
    embed: Callable,
    console: Console,
    checkpoint: Callable[[], object] | None = None,
) -> None:
    columns = (TextColumn("embed items"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("embed", total=len(items))
        for number, start in enumerate(range(0, len(items), EMBED_BATCH), start=1):
            batch = items[start : start + EMBED_BATCH]
            vectors = np.asarray(embed([item.title for item in batch]), np.float32)
            fields = [item.filter_fields() for item in batch]
            texts = [item_text(item.title, item.extras()) for item in batch] if index.has_lexical else None
            index.upsert([item.id for item in batch], vectors, fields, texts)
            titles.update((item.id, item.title) for item in batch)
            extras.update((item.id, item.extras()) for item in batch)
            if checkpoint is not None and number % CHECKPOINT_BATCHES == 0:
                checkpoint()
            progress.advance(task, len(batch))


def _commit(
    folder: Path,
    index: VectorIndex,
    titles: dict[str, str],
    extras: dict[str, dict],
    like: Manifest,
    version: int,
    lexical: bool = True,
) -> Manifest:
    """Write `index`, `titles`, the items' other fields and their BM25 index (`lexical`; a build's checkpoints,
    which nothing searches, skip it) as a complete new version folder, then replace the manifest to name it. On a
    write error (a full disk) nothing is committed and the staged files are removed."""
    previous = read_manifest(folder)
    name = f"v{version}-{secrets.token_hex(4)}"
    staging = folder / f".{name}.staging"
    manifest = replace(like, version=version, items=len(index), data=name)
    try:
        staging.mkdir(parents=True)
        index.save(staging)
        write_titles(staging, titles)
        write_items(staging, extras)
        # BM25 over the same items, rebuilt whole (bm25s has no incremental update): committed with the vectors,
        # unless the index keeps its own (Milvus BM25, filled by each upsert).
        if lexical and not index.has_lexical:
            LexicalIndex.build(titles, extras).save(staging)
        staging.rename(folder / name)
        write_manifest(folder, manifest)  # the commit point
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(folder / name, ignore_errors=True)
        raise _write_failed(staging, exc) from None
    _remove_versions(folder, keep={name, previous.data if previous else name})
    return manifest


def _write_failed(staging: Path, exc: OSError) -> CatalogError:
    reason = exc.strerror or str(exc)
    if exc.errno in NO_ROOM:
        return CatalogError(
            f"no room to write {staging} ({reason}): free disk space (or raise the quota or file-size limit) and "
            "run the command again; the index in use is unchanged"
        )
    return CatalogError(
        f"could not write {staging} ({reason}): fix that and run the command again; the index in use is unchanged"
    )


def _remove_versions(folder: Path, keep: set[str]) -> None:
    """Remove version folders but `keep` (the new and the previous one, which readers may still be loading),
    and what killed writers left. Each is renamed first, so a reader that still finds the folder it loaded
    under its name knows nothing was removed while it read."""
    for path in folder.iterdir():
        if path.name in keep or not VERSION_FOLDER.fullmatch(path.name):
            continue
        with suppress(OSError):  # what cannot be removed now, the next writer removes
            doomed = path if path.name.startswith(".") else path.rename(folder / f".{path.name}.old")
            shutil.rmtree(doomed)


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
def _writer(target: Path, operation: str, wait_s: float) -> Iterator[None]:
    """Hold the writers' lock of `target` (waiting up to `wait_s`); the lock file names its holder."""
    path = target.with_name(target.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.open("a+", encoding="utf-8")
    except OSError as exc:
        raise CatalogError(
            f"cannot open the writers' lock {path} ({exc.strerror}): make {path.parent} writable"
        ) from None
    with lock:  # closing the file releases the lock
        _acquire(lock, target, wait_s)
        with suppress(OSError):  # only a courtesy to waiting writers; a full disk is reported by the write itself
            lock.truncate(0)
            lock.write(f"`ecomserve index {operation}` (pid {os.getpid()}, since {datetime.now():%H:%M:%S})")
            lock.flush()
        try:
            yield
        finally:
            with suppress(OSError):
                lock.truncate(0)


def _acquire(lock: IO[str], target: Path, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                break
            time.sleep(LOCK_POLL_S)
        except OSError as exc:
            raise CatalogError(
                f"cannot lock {lock.name} ({exc.strerror}): keep the index on a file system with locks "
                "(on NFS: v4, or v3 with lockd)"
            ) from None
    lock.seek(0)
    holder = lock.read().strip() or "another writer"
    raise CatalogError(
        f"{target} is being written by {holder}; waited {wait_s:g} s: run this again when it has finished "
        "(or wait longer with --wait SECONDS)"
    )
