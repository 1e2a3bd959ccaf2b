"""`FaissIndex`: the in-process catalog index (`search.backend faiss`). Exact (`IndexFlatIP`) below
`faiss.exact_below` items, HNSW at or above it; saved into the index folder as versioned sub-folders behind an
atomically replaced pointer file."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from ecomserve.files import fsync_path
from ecomserve.index.filters import ItemFilter
from ecomserve.index.vector_index import (
    MissingIds,
    VectorIndexError,
    check_dim,
    checked_fields,
    checked_ids,
    checked_queries,
    checked_rows,
)
from ecomserve.spec import FaissSpec


class _ReadWriteLock:
    """Many readers or one writer. Writers go first once waiting, so a stream of searches cannot starve an upsert.
    faiss indexes are safe for concurrent searches but not for a search during add()."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


FaissKind = Literal["flat", "hnsw"]
POINTER = "faiss.current"  # names the live save folder; replaced atomically
SAVE_PREFIX = "faiss-"
# HNSW: a filter matching at most this many rows is answered exactly over their vectors (cheap, and a graph walk
# that must skip almost every node comes back short)
EXACT_FILTERED_BELOW = 2048
SELECTIONS_KEPT = 32  # the matching rows of this many filters are kept between writes
FORMAT_VERSION = 1


class FaissIndex:
    """In-process index. Row r of the faiss index is faiss label r; `_row_ids[r]` is its id, or None once the
    row is dead (deleted, or replaced by a later upsert of the same id): HNSW cannot remove vectors, so dead
    rows stay until a rebuild and searches fetch enough extra neighbours to skip them. Lexical search is the
    version's BM25 files beside it (lexical.LexicalIndex), so upsert's `texts` are not kept."""

    has_lexical = False

    def __init__(
        self, dim: int, spec: FaissSpec | None = None, directory: Path | None = None, compact_fraction: float = 0.2
    ) -> None:
        if dim < 1:
            raise VectorIndexError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.spec = spec or FaissSpec()
        self.directory = Path(directory) if directory is not None else None
        self.compact_fraction = compact_fraction  # dead rows beyond this share of all rows trigger a rebuild
        self._index: faiss.Index = self._new_index("flat" if self.spec.exact_below > 0 else "hnsw")
        self._row_ids: list[str | None] = []
        self._rows: dict[str, int] = {}
        self._fields: dict[str, dict] = {}  # each live id's filterable catalog fields (only ids that have some)
        self._selected: dict[str, np.ndarray] = {}  # filter key → its matching rows, until the next write
        self._rw = _ReadWriteLock()  # guards the faiss index and the id maps against searches
        self._writer = threading.Lock()  # one mutation or save at a time; searches go on during rebuild and save

    # -- the interface

    def upsert(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        fields: Sequence[dict] | None = None,
        texts: Sequence[str] | None = None,  # noqa: ARG002 (VectorIndex.upsert: faiss keeps no texts)
    ) -> None:
        given = checked_fields(ids, fields)
        ids, vectors = checked_rows(ids, vectors, self.dim)
        if not ids:
            return
        with self._writer:
            with self._rw.writing():
                self._selected.clear()  # rows move or change
                for item in ids:
                    old = self._rows.get(item)
                    if old is not None:
                        self._row_ids[old] = None
                    if given[item]:
                        self._fields[item] = given[item]
                    else:
                        self._fields.pop(item, None)
                start = len(self._row_ids)
                self._index.add(vectors)
                self._row_ids.extend(ids)
                self._rows.update((item, start + offset) for offset, item in enumerate(ids))
            self._maybe_rebuild()

    def delete(self, ids: Sequence[str]) -> int:
        ids = checked_ids(ids)
        with self._writer:
            with self._rw.writing():
                self._selected.clear()  # rows move or change
                removed = 0
                for item in set(ids):
                    row = self._rows.pop(item, None)
                    self._fields.pop(item, None)
                    if row is not None:
                        self._row_ids[row] = None
                        removed += 1
            if removed:
                self._maybe_rebuild()
            return removed

    def search(self, queries: np.ndarray, k: int, where: ItemFilter | None = None) -> list[list[tuple[str, float]]]:
        queries = checked_queries(queries, k, self.dim)
        if where is not None:
            return self._search_filtered(queries, k, where)
        with self._rw.reading():
            live, total = len(self._rows), len(self._row_ids)
            want = min(k, live)
            results: list[list[tuple[str, float]]] = [[] for _ in range(len(queries))]
            if want == 0 or not len(queries):
                return results
            # Fetch enough to leave `want` live rows on average, and fetch again (doubling) for the queries
            # whose neighbours were mostly dead, until the whole index has been asked for.
            fetch = min(total, want if live == total else math.ceil(want * total / live) + 8)
            pending = np.arange(len(queries))
            while True:
                scores, labels = self._search_rows(queries[pending], fetch)
                short = []
                for position, query in enumerate(pending):
                    hits = [
                        (item, float(score))
                        for score, label in zip(scores[position], labels[position])
                        if label >= 0 and (item := self._row_ids[label]) is not None
                    ]
                    results[query] = hits[:want]
                    if len(hits) < want:
                        short.append(query)
                if not short or fetch >= total:
                    return results
                pending, fetch = np.asarray(short), min(total, fetch * 2)

    def __len__(self) -> int:
        return len(self._rows)

    def ids(self) -> list[str]:
        with self._rw.reading():
            return list(self._rows)

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """Stored vectors by id, reconstructed from the faiss index (flat and HNSW-flat keep them exactly)."""
        ids = checked_ids(ids)
        with self._rw.reading():
            rows = [self._rows.get(item) for item in ids]
            missing = [item for item, row in zip(ids, rows) if row is None]
            if missing:
                raise MissingIds(list(dict.fromkeys(missing)))
            if not rows:
                return np.empty((0, self.dim), np.float32)
            return np.asarray(self._index.reconstruct_batch(np.asarray(rows, dtype=np.int64)), dtype=np.float32)

    def _search_filtered(self, queries: np.ndarray, k: int, where: ItemFilter) -> list[list[tuple[str, float]]]:
        """Only the live rows whose fields match `where`, selected inside faiss (an IDSelectorBatch through the
        search parameters, flat and HNSW), so a query gets min(k, matching) results. HNSW skips non-matching nodes
        as it walks the graph and may come back short when few match: such queries, and filters matching at most
        EXACT_FILTERED_BELOW rows, are answered exactly over the matching rows' vectors."""
        with self._rw.reading():
            rows = self._selected.get(where.key)
            if rows is None:
                fields = self._fields
                rows = np.fromiter(
                    (self._rows[item] for item, found in fields.items() if where.matches(found)), dtype=np.int64
                )
                rows.sort()
                if len(self._selected) >= SELECTIONS_KEPT:
                    self._selected.clear()
                self._selected[where.key] = rows
            want = min(k, len(rows))
            if want == 0 or not len(queries):
                return [[] for _ in range(len(queries))]
            hnsw = self.kind == "hnsw"
            if hnsw and len(rows) <= EXACT_FILTERED_BELOW:
                return self._exact_over(queries, rows, want)
            selector = faiss.IDSelectorBatch(rows)  # kept referenced until the search returns
            params = faiss.SearchParametersHNSW() if hnsw else faiss.SearchParameters()
            params.sel = selector
            if hnsw:
                params.efSearch = max(self.spec.ef_search, want)
            scores, labels = self._index.search(queries, want, params=params)
            results = [
                [(self._row_ids[label], float(score)) for score, label in zip(scores[q], labels[q]) if label >= 0]
                for q in range(len(queries))
            ]
            short = [q for q, hits in enumerate(results) if len(hits) < want]
            if short:
                for q, hits in zip(short, self._exact_over(queries[short], rows, want)):
                    results[q] = hits
            return results

    def _exact_over(self, queries: np.ndarray, rows: np.ndarray, want: int) -> list[list[tuple[str, float]]]:
        """Exact inner products with the vectors of `rows` (sorted), best first; called holding the read lock."""
        vectors = self._index.reconstruct_batch(rows)
        scores = queries @ vectors.T
        results = []
        for q in range(len(queries)):
            top = np.argpartition(-scores[q], want - 1)[:want] if want < len(rows) else np.arange(len(rows))
            top = top[np.lexsort((rows[top], -scores[q][top]))]  # best first; ties by row, as faiss orders them
            results.append([(self._row_ids[rows[i]], float(scores[q][i])) for i in top])
        return results

    # -- persistence

    @classmethod
    def open(cls, directory: Path, dim: int, spec: FaissSpec | None = None) -> FaissIndex:
        """Load the index saved in `directory`, or an empty one that save() will write there."""
        directory = Path(directory)
        if (directory / POINTER).is_file():
            return cls.load(directory, dim, spec)
        return cls(dim, spec, directory)

    @classmethod
    def load(cls, directory: Path, dim: int, spec: FaissSpec | None = None) -> FaissIndex:
        directory = Path(directory)
        for attempt in range(3):
            folder = directory / (directory / POINTER).read_text().strip()
            try:
                return cls._load_folder(folder, directory, dim, spec)
            except FileNotFoundError:
                # Two saves landed while we read and the older folder was cleared: read the new pointer.
                if attempt == 2:
                    raise VectorIndexError(f"{folder} vanished while loading: is another process saving?") from None
        raise AssertionError("unreachable")

    @classmethod
    def _load_folder(cls, folder: Path, directory: Path, dim: int, spec: FaissSpec | None) -> FaissIndex:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise VectorIndexError(f"{folder}: unknown index format {meta.get('format')}: rebuild the index")
        check_dim(meta["dim"], dim, index=f"index {directory}")
        index = cls(dim, spec, directory)
        row_ids: list[str | None] = json.loads((folder / "ids.json").read_text())
        saved = faiss.read_index(str(folder / "index.faiss"))
        if saved.ntotal != len(row_ids) or saved.d != dim:
            raise VectorIndexError(f"{folder}: index and ids disagree ({saved.ntotal} vs {len(row_ids)} rows): rebuild")
        index._row_ids = row_ids
        index._rows = {item: row for row, item in enumerate(row_ids) if item is not None}
        if (folder / "fields.json").is_file():  # saves before catalog fields have none
            index._fields = json.loads((folder / "fields.json").read_text())
        if _kind(saved) == index._wanted_kind() and _hnsw_m(saved) in (None, index.spec.hnsw_m):
            index._index = saved
            index._tune(saved)
        else:
            # The spec moved (exact_below, hnsw_m) since the save: rebuild from the raw vectors.
            vectors = np.load(folder / "vectors.npy", mmap_mode="r")
            index._index = index._build(index._wanted_kind(), vectors)
        return index

    def save(self, directory: Path | None = None) -> Path:
        """Write the index, ids and raw vectors to a new folder, then point `faiss.current` at it (an atomic
        replace), so a reader loads either the previous or the new index, never half of one. The previous
        folder is kept for readers still loading it; older ones are removed. One writer per directory."""
        directory = Path(directory) if directory is not None else self.directory
        if directory is None:
            raise VectorIndexError("save() needs a directory: this index was not opened from one")
        directory.mkdir(parents=True, exist_ok=True)
        name = f"{SAVE_PREFIX}{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        staging = directory / f".{name}.tmp"
        with self._writer:
            # No writer can run, so reading the index here is safe alongside concurrent searches.
            staging.mkdir()
            try:
                _write_faiss(self._index, staging / "index.faiss")
                _write_npy(self._all_vectors(), staging / "vectors.npy")
                (staging / "ids.json").write_text(json.dumps(self._row_ids, ensure_ascii=False))
                (staging / "fields.json").write_text(json.dumps(self._fields, ensure_ascii=False))
                meta = {"format": FORMAT_VERSION, "dim": self.dim, "kind": _kind(self._index), "live": len(self)}
                (staging / "meta.json").write_text(json.dumps(meta) + "\n")
                for path in staging.iterdir():
                    fsync_path(path)
                fsync_path(staging)
                staging.rename(directory / name)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        previous = (directory / POINTER).read_text().strip() if (directory / POINTER).is_file() else None
        pointer = directory / f".{POINTER}.{name}.tmp"
        pointer.write_text(name + "\n")
        fsync_path(pointer)
        os.replace(pointer, directory / POINTER)
        fsync_path(directory)
        for path in directory.iterdir():
            stale = path.name.startswith(SAVE_PREFIX) and path.name not in (name, previous)
            if stale or (path.name.startswith(f".{SAVE_PREFIX}") and path != staging):
                shutil.rmtree(path, ignore_errors=True)
        self.directory = directory
        return directory / name

    # -- internals

    @property
    def kind(self) -> FaissKind:
        return _kind(self._index)

    def _wanted_kind(self) -> FaissKind:
        return "hnsw" if len(self._rows) >= self.spec.exact_below else "flat"

    def _new_index(self, kind: FaissKind) -> faiss.Index:
        if kind == "flat":
            return faiss.IndexFlatIP(self.dim)
        index = faiss.IndexHNSWFlat(self.dim, self.spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.spec.ef_construction
        self._tune(index)
        return index

    def _tune(self, index: faiss.Index) -> None:
        if _kind(index) == "hnsw":
            faiss.downcast_index(index).hnsw.efSearch = self.spec.ef_search

    def _build(self, kind: FaissKind, vectors: np.ndarray) -> faiss.Index:
        index = self._new_index(kind)
        for start in range(0, len(vectors), 65_536):  # bounded copies when vectors are memory-mapped
            index.add(np.ascontiguousarray(vectors[start : start + 65_536], dtype=np.float32))
        return index

    def _search_rows(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "hnsw":
            # Per call, not index.hnsw.efSearch: concurrent searches must not change each other's breadth.
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.spec.ef_search, fetch)
            return self._index.search(queries, fetch, params=params)
        return self._index.search(queries, fetch)

    def _all_vectors(self) -> np.ndarray:
        if not self._index.ntotal:
            return np.empty((0, self.dim), np.float32)
        return self._index.reconstruct_n(0, self._index.ntotal)

    def _maybe_rebuild(self) -> None:
        """Called holding `_writer`. Switch flat → HNSW as soon as the catalog reaches `exact_below`; rebuild
        (dropping dead rows, and choosing the kind afresh) once dead rows pass `compact_fraction`."""
        total, live = len(self._row_ids), len(self._rows)
        grow = self.kind == "flat" and self._wanted_kind() == "hnsw"
        if not grow and (total - live) <= self.compact_fraction * total:
            return
        # Build beside the live index (searches continue; no other writer can run), then swap it in.
        keep = [row for row, item in enumerate(self._row_ids) if item is not None]
        built = self._build(self._wanted_kind(), self._all_vectors()[keep])
        with self._rw.writing():
            self._selected.clear()
            self._index = built
            self._row_ids = [self._row_ids[row] for row in keep]
            self._rows = {item: row for row, item in enumerate(self._row_ids) if item is not None}


def _kind(index: faiss.Index) -> FaissKind:
    return "hnsw" if isinstance(faiss.downcast_index(index), faiss.IndexHNSW) else "flat"


def _hnsw_m(index: faiss.Index) -> int | None:
    if _kind(index) != "hnsw":
        return None
    # Level 0 keeps 2*M neighbours per node: the M the graph was built with.
    return faiss.downcast_index(index).hnsw.nb_neighbors(1)


# faiss's own file writer and numpy's tofile report a failed write (a full disk) without its errno; written
# through Python files, it arrives as an OSError with the errno, which callers turn into what to do.


def _write_faiss(index: faiss.Index, path: Path) -> None:
    with path.open("wb") as handle:
        faiss.write_index(index, faiss.PyCallbackIOWriter(handle.write))


def _write_npy(array: np.ndarray, path: Path) -> None:
    """np.save's format (np.load reads it)."""
    array = np.ascontiguousarray(array)
    with path.open("wb") as handle:
        np.lib.format.write_array_header_1_0(handle, np.lib.format.header_data_from_array_1_0(array))
        handle.write(memoryview(array.reshape(-1)).cast("B"))  # flat: a view of no rows cannot be cast
