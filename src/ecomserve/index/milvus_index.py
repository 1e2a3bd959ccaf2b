"""`MilvusIndex`: the catalog index in a Milvus collection (`search.backend milvus`), on a Milvus server
(`http://host:19530` + a token read from the environment or a file, `milvus_token`) or Milvus Lite. A `.db`
path runs Milvus Lite inside the calling process and only that process can open it; a file this process serves
with `milvus_lite.start_milvus_lite` is reached through that server instead."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ecomserve.index.filters import ItemFilter
from ecomserve.index.lexical import tokens_text
from ecomserve.index.vector_index import (
    ID_MAX_BYTES,
    MissingIds,
    VectorIndexError,
    check_dim,
    checked_fields,
    checked_ids,
    checked_queries,
    checked_rows,
)
from ecomserve.spec import MilvusSpec

MILVUS_MAX_TOPK = 16_384  # Milvus refuses a larger limit
MILVUS_BATCH_BYTES = 16 << 20  # rows per insert kept well under gRPC's 64 MiB message limit
FIELDS = "fields"  # the JSON field holding each item's filterable catalog fields (FILTER → a Milvus expression)
FIELDS_MAX_BYTES = 16 << 10  # an item's fields, JSON-encoded, at most (catalog.py bounds them well under this)
# Milvus Lite 2.5 splices ids into SQL unescaped (a single quote breaks upsert and delete), and Milvus filter
# literals cannot carry control characters: refuse such ids up front, on every Milvus, so a catalog that works
# against Milvus Lite in development works against a server too.
MILVUS_BAD_ID = re.compile(r"['\x00-\x1f\x7f]")
# Milvus's own BM25 (2.5+, Milvus Lite 2.5.1 too): the item's lexical tokens (lexical.tokenize) joined by spaces in
# a VARCHAR that a whitespace analyzer splits back into them, so both backends match the same tokens; a BM25
# Function fills the sparse vector field from it on every insert, and searches it with metric BM25.
LEXICAL = "lexical"
LEXICAL_BM25 = "lexical_bm25"
LEXICAL_MAX_BYTES = 65_535  # Milvus's VARCHAR limit; a longer token text is cut at a token boundary

_clients: dict[tuple[str, str], Any] = {}
_clients_lock = threading.Lock()
_served: dict[Path, str] = {}  # db file → uri of the Milvus Lite servers this process started


class MilvusIndex:
    """A Milvus collection: VARCHAR primary key `id`, FLOAT_VECTOR `vector`, JSON `fields` (what FILTER matches),
    metric IP, AUTOINDEX (HNSW-like on a server; Milvus Lite accepts only FLAT, IVF_FLAT and AUTOINDEX and searches
    exactly), and the BM25 fields `lexical` / `lexical_bm25` (`MilvusLexical`). Reads are Strong by default, so a
    search never returns an id deleted before it; `consistency="Bounded"` trades that for latency."""

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

    def upsert(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        fields: Sequence[dict] | None = None,
        texts: Sequence[str] | None = None,
    ) -> None:
        """VectorIndex.upsert; `texts`: each item's lexical text (lexical.item_text), "" for none."""
        given = checked_fields(ids, fields)
        if texts is not None and len(texts) != len(ids):
            raise VectorIndexError(f"{len(texts)} texts for {len(ids)} ids")
        lexical = dict(zip(ids, texts or ["" for _ in ids]))
        ids, vectors = checked_rows(ids, vectors, self.dim)
        _check_milvus_ids(ids)
        if not self._filterable and any(given.values()):
            raise VectorIndexError(self._no_fields())
        step = max(1, MILVUS_BATCH_BYTES // (self.dim * 4 + ID_MAX_BYTES + FIELDS_MAX_BYTES))
        for start in range(0, len(ids), step):
            rows = [{"id": item, "vector": vectors[start + i]} for i, item in enumerate(ids[start : start + step])]
            for row in rows:
                if self._filterable:
                    row[FIELDS] = given[row["id"]]
                if self.has_lexical:
                    row[LEXICAL] = _bounded_tokens(lexical[row["id"]])
            self._call("upsert", self.collection, rows)

    def delete(self, ids: Sequence[str]) -> int:
        ids = sorted(set(checked_ids(ids)))
        _check_milvus_ids(ids)
        removed = 0
        # Milvus's delete count is the number of keys asked for, not found: look them up first.
        for start in range(0, len(ids), 1000):
            found = self._present(ids[start : start + 1000])
            if found:
                self._call("delete", self.collection, filter=f"id in {_literal(found)}")
                removed += len(found)
        return removed

    def search(self, queries: np.ndarray, k: int, where: ItemFilter | None = None) -> list[list[tuple[str, float]]]:
        queries = checked_queries(queries, k, self.dim)
        if k > MILVUS_MAX_TOPK:
            raise VectorIndexError(f"k={k}: Milvus returns at most {MILVUS_MAX_TOPK} results per query")
        if not len(queries):
            return []
        return [
            [(str(hit["id"]), float(hit["distance"])) for hit in hits]
            for hits in self._search(list(queries), "vector", "IP", k, where)
        ]

    def lexical_search(self, query: str, k: int, where: ItemFilter | None = None) -> list[tuple[str, float]]:
        """LexicalRetriever.search by Milvus's BM25 over the items' tokens; FILTER as in `search`."""
        text = tokens_text(query)
        if not text:
            return []
        (hits,) = self._search([text], LEXICAL_BM25, "BM25", min(k, MILVUS_MAX_TOPK), where)
        return [(str(hit["id"]), float(hit["distance"])) for hit in hits if hit["distance"] > 0]

    def _search(self, data: list, field: str, metric: str, k: int, where: ItemFilter | None) -> list:
        if where is not None and not self._filterable:
            raise VectorIndexError(self._no_fields())
        return self._call(
            "search",
            self.collection,
            data=data,
            anns_field=field,  # a collection with BM25 has two vector fields
            limit=k,
            output_fields=[],
            search_params={"metric_type": metric},
            consistency_level=self.consistency,
            # Milvus's own filtered search over the JSON field: min(k, matching) hits.
            **({"filter": where.milvus_expression(FIELDS)} if where is not None else {}),
        )

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

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """Stored vectors by id: a query by primary key that returns the vector field."""
        ids = checked_ids(ids)
        _check_milvus_ids(ids)
        wanted = list(dict.fromkeys(ids))
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(wanted), 1000):
            rows = self._call(
                "query",
                self.collection,
                filter=f"id in {_literal(wanted[start : start + 1000])}",
                output_fields=["id", "vector"],
                consistency_level=self.consistency,
            )
            found.update((str(row["id"]), np.asarray(row["vector"], dtype=np.float32)) for row in rows)
        missing = [item for item in wanted if item not in found]
        if missing:
            raise MissingIds(missing)
        if not ids:
            return np.empty((0, self.dim), np.float32)
        return np.stack([found[item] for item in ids])

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
        from pymilvus import DataType, Function, FunctionType, MilvusClient, MilvusException

        if not self._call("has_collection", self.collection):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            # One JSON field, not a scalar field per catalog field: Milvus Lite 2.5 has no nullable fields, and
            # an item may lack any of them; a missing JSON key never matches a filter, as FILTER means.
            schema.add_field(FIELDS, DataType.JSON)
            schema.add_field(
                LEXICAL,
                DataType.VARCHAR,
                max_length=LEXICAL_MAX_BYTES,
                enable_analyzer=True,
                analyzer_params={"tokenizer": "whitespace"},
            )
            schema.add_field(LEXICAL_BM25, DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(
                Function(
                    name="lexical_bm25",
                    function_type=FunctionType.BM25,
                    input_field_names=[LEXICAL],
                    output_field_names=[LEXICAL_BM25],
                )
            )
            index_params = self._client.prepare_index_params()
            index_params.add_index(field_name="vector", index_type="AUTOINDEX", metric_type="IP")
            index_params.add_index(field_name=LEXICAL_BM25, index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
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
        check_dim(int(vector["params"]["dim"]), self.dim, index=f"collection {self.collection} at {self.uri}")
        self._filterable = fields.get(FIELDS, {}).get("type") == DataType.JSON  # collections made before: no
        # Collections made before Milvus BM25 have no lexical fields: their versions keep bm25s files (ops._commit).
        self.has_lexical = fields.get(LEXICAL_BM25, {}).get("type") == DataType.SPARSE_FLOAT_VECTOR
        if str(self._call("get_load_state", self.collection).get("state")) != "Loaded":
            self._call("load_collection", self.collection)

    def _no_fields(self) -> str:
        return (
            f"collection {self.collection} at {self.uri} was made before catalog fields (no `{FIELDS}` field), so it "
            "cannot store or filter by them: drop it (or choose another search.milvus.collection) and rebuild the "
            "index with `ecomserve index build CATALOG`"
        )

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


class MilvusLexical:
    """A LexicalRetriever over a MilvusIndex's BM25 fields."""

    def __init__(self, index: MilvusIndex) -> None:
        self.index = index

    def search(self, query: str, k: int, where: ItemFilter | None = None) -> list[tuple[str, float]]:
        return self.index.lexical_search(query, k, where)


def _bounded_tokens(text: str) -> str:
    tokens = tokens_text(text)
    if len(tokens.encode("utf-8")) <= LEXICAL_MAX_BYTES:
        return tokens
    cut = tokens.encode("utf-8")[: LEXICAL_MAX_BYTES + 1].decode("utf-8", "ignore")
    return cut[: cut.rfind(" ")] if " " in cut else ""


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
                f"(`python -m ecomserve.index.milvus_lite {uri}`) and set search.milvus.uri to the "
                "http://127.0.0.1:PORT it prints"
            ) from None
        raise VectorIndexError(
            f"Milvus at {uri} is unreachable ({exc.message}): start it, or fix search.milvus.uri / the token"
        ) from None


def _drop_mvcc_warning(record: logging.LogRecord) -> bool:
    # Milvus Lite has no MVCC timestamps; the iterator falls back to the client's clock, which is what we want.
    return "mvccTs" not in record.getMessage()


def serve_through(db_file: Path, uri: str) -> None:
    """From now on this process opens `db_file` through the Milvus Lite server at `uri` (see `milvus_lite.py`)."""
    with _clients_lock:
        _served[db_file] = uri


def forget_server(db_file: Path, uri: str) -> None:
    """The server at `uri` stopped: its cached clients would only time out from now on."""
    with _clients_lock:
        _served.pop(db_file, None)
        for key in [key for key in _clients if key[0] == uri]:
            _clients.pop(key).close()
