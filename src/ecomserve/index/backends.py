"""Vector index backends for the catalog: string ids, L2-normalised float32 vectors, inner-product scores.

Two backends share the `VectorIndex` interface:

- `FaissIndex`: in-process. Exact (`IndexFlatIP`) below `faiss.exact_below` items, HNSW at or above it.
  Saved into the index folder as versioned sub-folders behind an atomically replaced pointer file.
- `MilvusIndex`: a Milvus server (`http://host:19530` + a token read from the environment or a file) or Milvus
  Lite. A `.db` path runs Milvus Lite inside the calling process and only that process can open it; for several
  processes (the `search` model and an `ecomserve index upsert`) run one Milvus Lite server on a loopback port
  with `start_milvus_lite` or `python -m ecomserve.index.backends milvus-lite catalog.db`, and point
  `search.milvus.uri` at the `http://127.0.0.1:PORT` it prints.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal, Protocol, runtime_checkable

import faiss
import numpy as np

from ecomserve.errors import EcomserveError
from ecomserve.server.process import free_port, port_is_free
from ecomserve.spec import FaissSpec, MilvusSpec, SearchSpec

ID_MAX_BYTES = 512  # the Milvus VARCHAR primary key's max_length; faiss keeps the same limit so a catalog fits both


class VectorIndexError(EcomserveError):
    """An index cannot do what was asked: wrong dimension, bad ids, unreachable server, unreadable files."""


@runtime_checkable
class VectorIndex(Protocol):
    dim: int

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Insert or replace by id; `vectors` is float32 [len(ids), dim]. A repeated id: the last row wins."""
        ...

    def delete(self, ids: Sequence[str]) -> int:
        """Remove these ids; unknown ids are ignored. Returns how many were actually removed."""
        ...

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Per query: up to k (id, score) pairs, best first, never a deleted id."""
        ...

    def __len__(self) -> int: ...

    def ids(self) -> list[str]:
        """Every live id, in no particular order."""
        ...

    def save(self, directory: Path) -> object:
        """Make every write so far durable in `directory` (where the backend keeps its data there)."""
        ...


def open_index(spec: SearchSpec, directory: Path, dim: int, relative_to: Path | None = None) -> VectorIndex:
    """The index of `spec.backend`. faiss: loaded from `directory` if saved there, else empty (save() writes
    it there). milvus: connected, the collection created if missing; a relative `.db` uri or token file is
    taken from `relative_to` (default: the parent of `directory`), so the CLI and the search model find the
    same file from any working dir."""
    if spec.backend == "faiss":
        return FaissIndex.open(directory, dim, spec.faiss)
    return MilvusIndex(spec.milvus, dim, relative_to=relative_to or Path(directory).parent)


# ---------------------------------------------------------------------------------------------------------------
# Input checks shared by both backends


def _checked_ids(ids: Sequence[str]) -> list[str]:
    ids = list(ids)
    for item in ids:
        if not isinstance(item, str) or not item:
            raise VectorIndexError(f"ids must be non-empty strings, got {item!r}")
        if len(item.encode("utf-8")) > ID_MAX_BYTES:
            raise VectorIndexError(f"id {item[:40]!r}… is longer than {ID_MAX_BYTES} bytes")
    return ids


def _checked_rows(ids: Sequence[str], vectors: np.ndarray, dim: int) -> tuple[list[str], np.ndarray]:
    """Ids and float32 C-contiguous vectors, one row per distinct id (the last occurrence wins)."""
    ids = _checked_ids(ids)
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise VectorIndexError(f"vectors must be [len(ids)={len(ids)}, dim], got shape {list(vectors.shape)}")
    _check_dim(dim, vectors.shape[1], "vectors")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise VectorIndexError("vectors contain NaN or infinity: check the encoder output")
    last = {item: row for row, item in enumerate(ids)}
    if len(last) < len(ids):
        rows = sorted(last.values())
        return [ids[row] for row in rows], vectors[rows]
    return ids, vectors


def _checked_queries(queries: np.ndarray, k: int, dim: int) -> np.ndarray:
    queries = np.asarray(queries)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2:
        raise VectorIndexError(f"queries must be [n, dim], got shape {list(queries.shape)}")
    _check_dim(dim, queries.shape[1], "queries")
    if k < 1:
        raise VectorIndexError(f"k must be at least 1, got {k}")
    return np.ascontiguousarray(queries, dtype=np.float32)


def _check_dim(index_dim: int, got: int, what: str = "vectors", index: str = "index") -> None:
    if got != index_dim:
        raise VectorIndexError(
            f"{index} has dim {index_dim}, {what} have {got}: rebuild the index for this encoder "
            "(`ecomserve index build CATALOG`)"
        )


# ---------------------------------------------------------------------------------------------------------------
# faiss


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
FORMAT_VERSION = 1


class FaissIndex:
    """In-process index. Row r of the faiss index is faiss label r; `_row_ids[r]` is its id, or None once the
    row is dead (deleted, or replaced by a later upsert of the same id): HNSW cannot remove vectors, so dead
    rows stay until a rebuild and searches fetch enough extra neighbours to skip them."""

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
        self._rw = _ReadWriteLock()  # guards the faiss index and the id maps against searches
        self._writer = threading.Lock()  # one mutation or save at a time; searches go on during rebuild and save

    # -- the interface

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        ids, vectors = _checked_rows(ids, vectors, self.dim)
        if not ids:
            return
        with self._writer:
            with self._rw.writing():
                for item in ids:
                    old = self._rows.get(item)
                    if old is not None:
                        self._row_ids[old] = None
                start = len(self._row_ids)
                self._index.add(vectors)
                self._row_ids.extend(ids)
                self._rows.update((item, start + offset) for offset, item in enumerate(ids))
            self._maybe_rebuild()

    def delete(self, ids: Sequence[str]) -> int:
        ids = _checked_ids(ids)
        with self._writer:
            with self._rw.writing():
                removed = 0
                for item in set(ids):
                    row = self._rows.pop(item, None)
                    if row is not None:
                        self._row_ids[row] = None
                        removed += 1
            if removed:
                self._maybe_rebuild()
            return removed

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        queries = _checked_queries(queries, k, self.dim)
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
        _check_dim(meta["dim"], dim, index=f"index {directory}")
        index = cls(dim, spec, directory)
        row_ids: list[str | None] = json.loads((folder / "ids.json").read_text())
        saved = faiss.read_index(str(folder / "index.faiss"))
        if saved.ntotal != len(row_ids) or saved.d != dim:
            raise VectorIndexError(f"{folder}: index and ids disagree ({saved.ntotal} vs {len(row_ids)} rows): rebuild")
        index._row_ids = row_ids
        index._rows = {item: row for row, item in enumerate(row_ids) if item is not None}
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
                meta = {"format": FORMAT_VERSION, "dim": self.dim, "kind": _kind(self._index), "live": len(self)}
                (staging / "meta.json").write_text(json.dumps(meta) + "\n")
                for path in staging.iterdir():
                    _fsync(path)
                _fsync(staging)
                staging.rename(directory / name)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        previous = (directory / POINTER).read_text().strip() if (directory / POINTER).is_file() else None
        pointer = directory / f".{POINTER}.{name}.tmp"
        pointer.write_text(name + "\n")
        _fsync(pointer)
        os.replace(pointer, directory / POINTER)
        _fsync(directory)
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


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------------------------------------------
# Milvus

MILVUS_MAX_TOPK = 16_384  # Milvus refuses a larger limit
MILVUS_BATCH_BYTES = 16 << 20  # rows per insert kept well under gRPC's 64 MiB message limit
# Milvus Lite 2.5 splices ids into SQL unescaped (a single quote breaks upsert and delete), and Milvus filter
# literals cannot carry control characters: refuse such ids up front, on every Milvus, so a catalog that works
# against Milvus Lite in development works against a server too.
MILVUS_BAD_ID = re.compile(r"['\x00-\x1f\x7f]")

_clients: dict[tuple[str, str], Any] = {}
_clients_lock = threading.Lock()
_served: dict[Path, str] = {}  # db file → uri of the Milvus Lite servers this process started


class MilvusIndex:
    """A Milvus collection: VARCHAR primary key `id`, FLOAT_VECTOR `vector`, metric IP, AUTOINDEX (HNSW-like on
    a server; Milvus Lite accepts only FLAT, IVF_FLAT and AUTOINDEX and searches exactly). Reads are Strong by
    default, so a search never returns an id deleted before it; `consistency="Bounded"` trades that for latency."""

    def __init__(
        self,
        spec: MilvusSpec,
        dim: int,
        relative_to: Path | None = None,
        timeout_s: float = 10.0,
        consistency: Literal["Strong", "Bounded", "Session", "Eventually"] = "Strong",
    ) -> None:
        self.dim = dim
        self.uri = _resolve_uri(spec.uri, relative_to)
        self.collection = spec.collection
        self.consistency = consistency
        self._client = _milvus_client(self.uri, milvus_token(spec, relative_to), timeout_s)
        self._ensure_collection()

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        ids, vectors = _checked_rows(ids, vectors, self.dim)
        _check_milvus_ids(ids)
        step = max(1, MILVUS_BATCH_BYTES // (self.dim * 4 + ID_MAX_BYTES))
        for start in range(0, len(ids), step):
            rows = [{"id": item, "vector": vectors[start + i]} for i, item in enumerate(ids[start : start + step])]
            self._call("upsert", self.collection, rows)

    def delete(self, ids: Sequence[str]) -> int:
        ids = sorted(set(_checked_ids(ids)))
        _check_milvus_ids(ids)
        removed = 0
        # Milvus's delete count is the number of keys asked for, not found: look them up first.
        for start in range(0, len(ids), 1000):
            found = self._present(ids[start : start + 1000])
            if found:
                self._call("delete", self.collection, filter=f"id in {_literal(found)}")
                removed += len(found)
        return removed

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        queries = _checked_queries(queries, k, self.dim)
        if k > MILVUS_MAX_TOPK:
            raise VectorIndexError(f"k={k}: Milvus returns at most {MILVUS_MAX_TOPK} results per query")
        if not len(queries):
            return []
        results = self._call(
            "search",
            self.collection,
            data=list(queries),
            limit=k,
            output_fields=[],
            search_params={"metric_type": "IP"},
            consistency_level=self.consistency,
        )
        return [[(str(hit["id"]), float(hit["distance"])) for hit in hits] for hits in results]

    def __len__(self) -> int:
        rows = self._call(
            "query", self.collection, filter="", output_fields=["count(*)"], consistency_level=self.consistency
        )
        return int(rows[0]["count(*)"])

    def ids(self) -> list[str]:
        iterator = self._call("query_iterator", self.collection, batch_size=4096, filter="", output_fields=["id"])
        found: list[str] = []
        try:
            while batch := iterator.next():
                found.extend(row["id"] for row in batch)
        finally:
            iterator.close()
        return found

    def save(self, directory: Path) -> None:
        """Nothing to write: the Milvus server already holds every upsert and delete."""

    def flush(self) -> None:
        """Seal what was written (optional: Milvus keeps writes durable without it)."""
        self._call("flush", self.collection)

    # -- internals

    def _present(self, ids: list[str]) -> list[str]:
        rows = self._call(
            "query",
            self.collection,
            filter=f"id in {_literal(ids)}",
            output_fields=["id"],
            consistency_level="Strong",  # the count returned by delete() must be exact
        )
        return [row["id"] for row in rows]

    def _ensure_collection(self) -> None:
        from pymilvus import DataType, MilvusClient, MilvusException

        if not self._call("has_collection", self.collection):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            index_params = self._client.prepare_index_params()
            index_params.add_index(field_name="vector", index_type="AUTOINDEX", metric_type="IP")
            try:
                self._client.create_collection(
                    self.collection, schema=schema, index_params=index_params, consistency_level="Strong"
                )
            except MilvusException:
                if not self._call("has_collection", self.collection):  # else another process made it first
                    raise
        fields = {field["name"]: field for field in self._call("describe_collection", self.collection)["fields"]}
        vector = fields.get("vector", {})
        if "id" not in fields or vector.get("type") != DataType.FLOAT_VECTOR:
            raise VectorIndexError(
                f"collection {self.collection} at {self.uri} is not a catalog index (no `id` and `vector` "
                "fields): choose another search.milvus.collection"
            )
        _check_dim(int(vector["params"]["dim"]), self.dim, index=f"collection {self.collection} at {self.uri}")
        if str(self._call("get_load_state", self.collection).get("state")) != "Loaded":
            self._call("load_collection", self.collection)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from pymilvus import MilvusException

        try:
            return getattr(self._client, method)(*args, **kwargs)
        except MilvusException as exc:
            raise VectorIndexError(
                f"Milvus at {self.uri}, collection {self.collection}: {method} failed: {exc}"
            ) from exc


def milvus_token(spec: MilvusSpec, relative_to: Path | None = None) -> str:
    """The token, read now from where the spec points (`token_env` or `token_file`; "" for neither): the spec
    only names the place, because it is written into the search model's config, which Triton serves to anyone.
    Read again at every connection, so a rotated Kubernetes Secret file takes effect at the next reload."""
    if spec.token_env:
        token = os.environ.get(spec.token_env, "")
        if not token:
            raise VectorIndexError(
                f"search.milvus.token_env: {spec.token_env} is not set in this process's environment: set it to "
                "the Milvus token (for the server, in tritonserver's environment, e.g. from a Kubernetes Secret)"
            )
        return token
    if spec.token_file:
        path = Path(spec.token_file).expanduser()
        path = path if path.is_absolute() or relative_to is None else relative_to / path
        try:
            token = path.read_text(encoding="utf-8").strip()  # Secret files often end in a newline
        except OSError as exc:
            raise VectorIndexError(
                f"search.milvus.token_file {path}: cannot read it ({exc.strerror}): mount or create it, readable "
                "by this process"
            ) from None
        if not token:
            raise VectorIndexError(f"search.milvus.token_file {path} is empty: write the Milvus token into it")
        return token
    return ""


def _check_milvus_ids(ids: list[str]) -> None:
    bad = [item for item in ids if MILVUS_BAD_ID.search(item)]
    if bad:
        raise VectorIndexError(
            f"ids {bad[:3]!r} contain a single quote or a control character, which Milvus cannot match: "
            "change them in the catalog, or use search.backend faiss"
        )


def _literal(ids: list[str]) -> str:
    # Milvus string literals take double quotes with backslash escapes, as JSON writes them.
    return json.dumps(ids, ensure_ascii=False)


def _resolve_uri(uri: str, relative_to: Path | None) -> str:
    if "://" in uri or uri.startswith("unix:"):
        return uri
    path = Path(uri).expanduser()
    if not path.is_absolute() and relative_to is not None:
        path = relative_to / path
    path = path.resolve()
    # A file this process serves with start_milvus_lite: opening it in-process as well would start a second
    # Milvus Lite on the same file, so go through the server.
    return _served.get(path, str(path))


def _milvus_client(uri: str, token: str, timeout_s: float) -> Any:
    """One client per (uri, token) and process: the search model reopens the index on every catalog change, and
    a fresh client each time would leak a gRPC channel (and, for a `.db`, the in-process Milvus Lite)."""
    with _clients_lock:
        client = _clients.get((uri, token))
        if client is None:
            client = _clients[(uri, token)] = _connect(uri, token, timeout_s)
        return client


def _connect(uri: str, token: str, timeout_s: float) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # milvus_lite imports the deprecated pkg_resources
            from pymilvus import MilvusClient, MilvusException

            if uri.endswith(".db"):
                import milvus_lite.server_manager  # noqa: F401
    except ImportError as exc:
        raise VectorIndexError(
            f"search.backend milvus needs pymilvus: pip install 'ecomserve[milvus]' ({exc})"
        ) from None
    logging.getLogger("pymilvus.orm.iterator").addFilter(_drop_mvcc_warning)
    if uri.endswith(".db") and not Path(uri).parent.is_dir():
        raise VectorIndexError(f"Milvus Lite file {uri}: folder {Path(uri).parent} does not exist")
    try:
        return MilvusClient(uri=uri, token=token, timeout=timeout_s)
    except MilvusException as exc:
        if uri.endswith(".db"):
            raise VectorIndexError(
                f"Milvus Lite could not open {uri} ({exc.message}). A .db path serves one process only: if the "
                f"search model or another command has it open, run one server for all of them "
                f"(`python -m ecomserve.index.backends milvus-lite {uri}`) and set search.milvus.uri to the "
                "http://127.0.0.1:PORT it prints"
            ) from None
        raise VectorIndexError(
            f"Milvus at {uri} is unreachable ({exc.message}): start it, or fix search.milvus.uri / the token"
        ) from None


def _drop_mvcc_warning(record: logging.LogRecord) -> bool:
    # Milvus Lite has no MVCC timestamps; the iterator falls back to the client's clock, which is what we want.
    return "mvccTs" not in record.getMessage()


# ---------------------------------------------------------------------------------------------------------------
# One Milvus Lite server for several processes
#
# milvus_lite ships a `milvus` binary: `milvus DB_FILE ADDRESS LOG_LEVEL [LOCK_FILE]`. pymilvus runs it for a
# `.db` uri on a private unix socket and connects only the calling process. Started here on a loopback TCP port
# instead, any number of processes connect with MilvusClient(uri="http://127.0.0.1:PORT"). The binary watches
# the lock file: it stops by itself when the starting process releases the lock, also when that process dies.


class MilvusLiteServer:
    """A running Milvus Lite server; `uri` is what every process passes to MilvusClient / search.milvus.uri."""

    def __init__(self, uri: str, db_file: Path, process: subprocess.Popen, lock: IO[str], log: Path) -> None:
        self.uri, self.db_file, self.log = uri, db_file, log
        self._process: subprocess.Popen | None = process
        self._lock: IO[str] | None = lock

    def stop(self) -> None:
        # Releasing the lock is the binary's signal to shut down cleanly; it is killed if it does not.
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
            self._process = None
        with _clients_lock:  # cached clients of this server would only time out from now on
            _served.pop(self.db_file, None)
            for key in [key for key in _clients if key[0] == self.uri]:
                _clients.pop(key).close()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> MilvusLiteServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_milvus_lite(
    db_file: Path, host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 30.0
) -> MilvusLiteServer:
    """Serve `db_file` on host:port (a free port if None) until stop(), or until this process exits.
    The log goes to `.<db name>.log` beside the file."""
    db_file = Path(db_file).expanduser().resolve()
    # milvus_lite's own limits on the file name (it names internal files after it).
    if not re.fullmatch(r"[a-zA-Z0-9.\-_]+", db_file.name) or len(db_file.name) > 36 or db_file.suffix != ".db":
        raise VectorIndexError(f"{db_file.name}: a Milvus Lite file name is at most 36 of [a-zA-Z0-9.-_] ending .db")
    if not db_file.parent.is_dir():
        raise VectorIndexError(f"Milvus Lite file {db_file}: folder {db_file.parent} does not exist")
    spec = importlib.util.find_spec("milvus_lite")
    binary = (
        Path(spec.submodule_search_locations[0]) / "lib" / "milvus"
        if spec and spec.submodule_search_locations
        else None
    )
    if binary is None or not binary.is_file():
        raise VectorIndexError("Milvus Lite is not installed: pip install 'ecomserve[milvus]'")
    lock_path = db_file.parent / f".{db_file.name}.lock"  # the name pymilvus' in-process Milvus Lite uses too
    lock = lock_path.open("a")
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise VectorIndexError(f"Milvus Lite file {db_file} is already open in another process") from None
    if port is not None and not port_is_free(host, port):
        lock.close()
        raise VectorIndexError(f"{host}:{port} is in use: choose another port for Milvus Lite")
    log = db_file.parent / f".{db_file.name}.log"
    env = {**os.environ, "LD_LIBRARY_PATH": f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    deadline = time.monotonic() + timeout_s
    for _attempt in range(3):  # a free port can be taken between choosing and binding it
        chosen = port or free_port(host)
        with log.open("w") as log_file:
            process = subprocess.Popen(
                [str(binary), str(db_file), f"{host}:{chosen}", os.environ.get("LOG_LEVEL", "ERROR"), str(lock_path)],
                cwd=db_file.parent,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the owner, which stops the server in order
            )
        while process.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection((host, chosen), timeout=1).close()
            except OSError:
                time.sleep(0.05)
                continue
            server = MilvusLiteServer(f"http://{host}:{chosen}", db_file, process, lock, log)
            with _clients_lock:
                _served[db_file] = server.uri
            return server
        if process.poll() is None:
            process.kill()
            process.wait()
            break
        if port is not None:
            break
    lock.close()
    tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
    raise VectorIndexError(f"Milvus Lite did not start serving {db_file} on {host}: see {log}\n{tail}")


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m ecomserve.index.backends milvus-lite FILE.db [--port 19530]`: a shared Milvus Lite for
    development, until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m ecomserve.index.backends")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("milvus-lite", help="serve a Milvus Lite file to several processes")
    serve.add_argument("db_file", type=Path)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=19530)
    args = parser.parse_args(argv)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    with start_milvus_lite(args.db_file, args.host, args.port) as server:
        print(f"Milvus Lite serving {server.db_file} at {server.uri} (log {server.log}); set search.milvus.uri to it")
        try:
            while server.running and not stopping.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
