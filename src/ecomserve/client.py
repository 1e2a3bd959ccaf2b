"""A small Python API over tritonclient for the public models: embed, rank, classify, search, similar.

Safe to share between threads: each thread gets its own tritonclient connection (tritonclient's
clients are not thread-safe), reused for every call that thread makes."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
from tritonclient.utils import InferenceServerException

from ecomserve.contract import (
    API_KEY_ENV,
    API_KEY_HEADER,
    CANDIDATES,
    CLASSIFY,
    DIVERSITY,
    EMBED,
    EMBEDDING,
    ENCODER_SCORES,
    FILTER,
    IDS,
    ITEM_IDS,
    LABEL,
    LABELS,
    MODE,
    QUERY,
    RANK,
    SCORES,
    SEARCH,
    SIMILAR,
    TEXT,
    TOP_K,
    VOTES,
)
from ecomserve.errors import RequestFailed

Protocol = Literal["http", "grpc"]
DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}


@dataclass(frozen=True)
class RankResult:
    scores: np.ndarray  # [candidates] fused score, input order
    encoder_scores: np.ndarray  # [encoders, candidates] cosine per encoder

    def order(self) -> list[int]:
        """Candidate indices, best first."""
        return [int(i) for i in np.argsort(-self.scores, kind="stable")]


@dataclass(frozen=True)
class ClassifyResult:
    label: str
    votes: np.ndarray  # [labels] votes per label
    scores: np.ndarray  # [labels] fused score per label


@dataclass(frozen=True)
class SearchResult:
    ids: list[str]  # best first
    scores: np.ndarray  # [len(ids)] fused score of each


def _module(protocol: Protocol):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    return module


def bytes_input(module, name: str, texts: list[str], shape: list[int]):
    """A BYTES tensor of UTF-8 texts for `module` (tritonclient.http, .grpc or .grpc.aio)."""
    tensor = module.InferInput(name, shape, "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode("utf-8") for t in texts], dtype=np.object_).reshape(shape))
    return tensor


def catalog_inputs(  # noqa: PLR0913
    module,
    inputs: list,
    top_k: int | None,
    filter: dict | str | None,  # noqa: A002
    mode: str | None = None,
    diversity: float | None = None,
):
    """`inputs` of `search` or `similar` followed by their optional TOP_K, FILTER (an object or its JSON text),
    (search) MODE and (similar) DIVERSITY; an option left None is not sent, so the server's default applies."""
    inputs = list(inputs)
    if top_k is not None:
        inputs.append(_scalar_input(module, TOP_K, np.int32(top_k), "INT32"))
    if filter is not None:
        text = filter if isinstance(filter, str) else json.dumps(filter, ensure_ascii=False)
        inputs.append(bytes_input(module, FILTER, [text], [1]))
    if mode is not None:
        inputs.append(bytes_input(module, MODE, [mode], [1]))
    if diversity is not None:
        inputs.append(_scalar_input(module, DIVERSITY, np.float32(diversity), "FP32"))
    return inputs


def _scalar_input(module, name: str, value: np.generic, datatype: str):
    tensor = module.InferInput(name, [1], datatype)
    tensor.set_data_from_numpy(np.array([value]))
    return tensor


class EcomClient:
    def __init__(
        self,
        url: str | None = None,
        protocol: Protocol = "http",
        timeout_s: float = 60.0,
        max_batch: int = 64,
        api_key: str | None = None,
    ):
        """`api_key`: the server's inference API key, if it has one (default: $ECOMSERVE_API_KEY)."""
        self.protocol = protocol
        api_key = api_key or os.environ.get(API_KEY_ENV)
        self._headers = {API_KEY_HEADER: f"Bearer {api_key}"} if api_key else None
        self.max_batch = max_batch  # embed's max_batch_size: longer lists go in several requests
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout_s = timeout_s
        self._module = _module(protocol)
        self._local = threading.local()
        self._clients = []
        self._lock = threading.Lock()

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "http":
                client = self._module.InferenceServerClient(
                    self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
                )
            else:
                client = self._module.InferenceServerClient(self.url)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _bytes_input(self, name: str, texts: list[str], shape: list[int]):
        return bytes_input(self._module, name, texts, shape)

    def _infer(self, model: str, inputs: list, outputs: list[str]) -> dict[str, np.ndarray]:
        # HTTP's network timeout is set on the connection; gRPC takes a deadline per call.
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            result = self._client().infer(model, inputs, headers=self._headers, **kwargs)
        except InferenceServerException as exc:
            raise RequestFailed(f"{model}: {exc.message()} (status {exc.status()})") from None
        except OSError as exc:
            raise RequestFailed(
                f"cannot reach the {self.protocol} endpoint {self.url} ({exc}); is `ecomserve serve` running?"
            ) from None
        return {name: result.as_numpy(name) for name in outputs}

    def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), D] fused, unit-norm embeddings."""
        chunks = [texts[i : i + self.max_batch] for i in range(0, len(texts), self.max_batch)]
        return np.concatenate(
            [self._infer(EMBED, [self._bytes_input(TEXT, c, [len(c), 1])], [EMBEDDING])[EMBEDDING] for c in chunks]
        )

    def rank(self, query: str, candidates: list[str]) -> RankResult:
        inputs = [
            self._bytes_input(QUERY, [query], [1]),
            self._bytes_input(CANDIDATES, candidates, [len(candidates)]),
        ]
        out = self._infer(RANK, inputs, [SCORES, ENCODER_SCORES])
        return RankResult(out[SCORES], out[ENCODER_SCORES])

    def classify(self, text: str, labels: list[str]) -> ClassifyResult:
        inputs = [self._bytes_input(TEXT, [text], [1]), self._bytes_input(LABELS, labels, [len(labels)])]
        out = self._infer(CLASSIFY, inputs, [LABEL, VOTES, SCORES])
        return ClassifyResult(out[LABEL][0].decode("utf-8"), out[VOTES], out[SCORES])

    def search(
        self,
        query: str,
        top_k: int | None = None,
        filter: dict | str | None = None,  # noqa: A002
        mode: str | None = None,
    ) -> SearchResult:
        """Catalog items for `query`, best first; `top_k` defaults to the server's search.top_k. `filter`: a
        FILTER object (or its JSON text) over catalog fields, e.g. {"brand": "ASICS", "price": {"lte": 100}}.
        `mode`: hybrid, dense or lexical (default: the server's search.mode)."""
        inputs = catalog_inputs(self._module, [self._bytes_input(QUERY, [query], [1])], top_k, filter, mode)
        return self._found(SEARCH, inputs)

    def similar(
        self,
        ids: list[str],
        top_k: int | None = None,
        filter: dict | str | None = None,  # noqa: A002
        diversity: float | None = None,
    ) -> SearchResult:
        """Catalog items similar to `ids` (one item, or a shopper's recent items, most recent last), best first,
        never one of `ids`; `top_k` defaults to the server's search.top_k; `filter` as `search`'s; `diversity`
        (0…1, default the server's search.diversity) trades similarity for variety (MMR)."""
        ids_input = self._bytes_input(ITEM_IDS, list(ids), [len(ids)])
        inputs = catalog_inputs(self._module, [ids_input], top_k, filter, diversity=diversity)
        return self._found(SIMILAR, inputs)

    def _found(self, model: str, inputs: list) -> SearchResult:
        out = self._infer(model, inputs, [IDS, SCORES])
        return SearchResult([i.decode("utf-8") for i in out[IDS]], out[SCORES])

    def is_ready(self) -> bool:
        try:
            return bool(self._client().is_server_ready(headers=self._headers))
        except (InferenceServerException, OSError):
            return False

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
        self._local = threading.local()

    def __enter__(self) -> EcomClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
