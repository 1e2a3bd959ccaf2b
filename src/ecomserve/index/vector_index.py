"""The catalog's vector index interface: string ids, L2-normalised float32 vectors, inner-product scores.

Two backends implement `VectorIndex`:

- `FaissIndex` (`faiss_index.py`): in-process. Exact (`IndexFlatIP`) below `faiss.exact_below` items, HNSW at
  or above it. Saved into the index folder as versioned sub-folders behind an atomically replaced pointer file.
- `MilvusIndex` (`milvus_index.py`): a Milvus server (`http://host:19530` + a token read from the environment
  or a file) or Milvus Lite. A `.db` path runs Milvus Lite inside the calling process and only that process can
  open it; for several processes (the `search` model and an `ecomserve index upsert`) run one Milvus Lite server
  on a loopback port with `start_milvus_lite` or `python -m ecomserve.index.milvus_lite catalog.db`
  (`milvus_lite.py`), and point `search.milvus.uri` at the `http://127.0.0.1:PORT` it prints.

`open_index` (`loading.py`) opens the backend a spec names. This module holds the interface, its error and the
input checks every backend applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from ecomserve.errors import EcomserveError

if TYPE_CHECKING:
    from ecomserve.index.filters import ItemFilter

ID_MAX_BYTES = 512  # the Milvus VARCHAR primary key's max_length; faiss keeps the same limit so a catalog fits both


class VectorIndexError(EcomserveError):
    """An index cannot do what was asked: wrong dimension, bad ids, unreachable server, unreadable files."""


class MissingIds(VectorIndexError):
    """`vectors()` was asked for ids the index does not hold; `missing` lists them, in the order asked."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(f"unknown ids: {missing}")
        self.missing = missing


@runtime_checkable
class VectorIndex(Protocol):
    dim: int
    # Whether the index also answers BM25 queries over `texts` given to upsert (Milvus: `MilvusLexical`); if not,
    # each version gets its own BM25 files (lexical.LexicalIndex).
    has_lexical: bool

    def upsert(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        fields: Sequence[Mapping] | None = None,
        texts: Sequence[str] | None = None,
    ) -> None:
        """Insert or replace by id; `vectors` is float32 [len(ids), dim]. A repeated id: the last row wins.
        `fields`: each item's filterable catalog fields (`CatalogItem.filter_fields()`), none when omitted.
        `texts`: each item's lexical text (`lexical.item_text`), kept only where `has_lexical`."""
        ...

    def delete(self, ids: Sequence[str]) -> int:
        """Remove these ids; unknown ids are ignored. Returns how many were actually removed."""
        ...

    def search(self, queries: np.ndarray, k: int, where: ItemFilter | None = None) -> list[list[tuple[str, float]]]:
        """Per query: up to k (id, score) pairs, best first, never a deleted id; with `where`, only items whose
        catalog fields (given to upsert) match it, filtered inside the search: min(k, matching) pairs."""
        ...

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of `ids`: float32 [len(ids), dim], in the order asked (a repeated id repeats its
        row). Raises MissingIds naming every id the index does not hold."""
        ...

    def __len__(self) -> int: ...

    def ids(self) -> list[str]:
        """Every live id, in no particular order."""
        ...

    def save(self, directory: Path) -> object:
        """Make every write so far durable in `directory` (where the backend keeps its data there)."""
        ...


# ---------------------------------------------------------------------------------------------------------------
# Input checks shared by every backend


def checked_ids(ids: Sequence[str]) -> list[str]:
    ids = list(ids)
    for item in ids:
        if not isinstance(item, str) or not item:
            raise VectorIndexError(f"ids must be non-empty strings, got {item!r}")
        if len(item.encode("utf-8")) > ID_MAX_BYTES:
            raise VectorIndexError(f"id {item[:40]!r}… is longer than {ID_MAX_BYTES} bytes")
    return ids


def checked_rows(ids: Sequence[str], vectors: np.ndarray, dim: int) -> tuple[list[str], np.ndarray]:
    """Ids and float32 C-contiguous vectors, one row per distinct id (the last occurrence wins)."""
    ids = checked_ids(ids)
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise VectorIndexError(f"vectors must be [len(ids)={len(ids)}, dim], got shape {list(vectors.shape)}")
    check_dim(dim, vectors.shape[1], "vectors")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise VectorIndexError("vectors contain NaN or infinity: check the encoder output")
    last = {item: row for row, item in enumerate(ids)}
    if len(last) < len(ids):
        rows = sorted(last.values())
        return [ids[row] for row in rows], vectors[rows]
    return ids, vectors


def checked_fields(ids: Sequence[str], fields: Sequence[Mapping] | None) -> dict[str, dict]:
    """Each id's filterable fields (the last occurrence of a repeated id wins), {} for each when omitted."""
    if fields is None:
        return {item: {} for item in ids}
    fields = list(fields)
    if len(fields) != len(ids):
        raise VectorIndexError(f"fields must have one entry per id ({len(ids)}), got {len(fields)}")
    return {item: dict(entry or {}) for item, entry in zip(ids, fields)}


def checked_queries(queries: np.ndarray, k: int, dim: int) -> np.ndarray:
    queries = np.asarray(queries)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2:
        raise VectorIndexError(f"queries must be [n, dim], got shape {list(queries.shape)}")
    check_dim(dim, queries.shape[1], "queries")
    if k < 1:
        raise VectorIndexError(f"k must be at least 1, got {k}")
    return np.ascontiguousarray(queries, dtype=np.float32)


def check_dim(index_dim: int, got: int, what: str = "vectors", index: str = "index") -> None:
    if got != index_dim:
        raise VectorIndexError(
            f"{index} has dim {index_dim}, {what} have {got}: rebuild the index for this encoder "
            "(`ecomserve index build CATALOG`)"
        )
