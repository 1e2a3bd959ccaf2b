"""search: QUERY (+ optional TOP_K, FILTER) → IDS, SCORES (and the items' TITLES) from the catalog index.
FILTER (ecomserve.index.filters) is applied inside the index search; the result cache is keyed by it too.

Only the query is embedded at request time, and always by the release that embedded the index (the
manifest says which): the query goes through BLS to that release's own model versions, never through
`embed`, which serves whatever release is live. If that release is no longer loaded the request is
refused with what to do, so vectors of two releases are never compared. The query gets the pipeline's
query prompt (ecomserve.prompts), rerank's titles the passage prompt; an index whose manifest names another
passage prompt is refused the same way, with the rebuild to run.

The index is re-read when its manifest moves (upserts, deletes, rebuilds), all of it from the version
folder the manifest names, so every instance answers from one whole version; the result cache is keyed
by index version and release, so a change is visible at the next request."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from cachetools import TTLCache

from ecomserve.contract import (
    ATTENTION_MASK,
    EMBEDDER,
    EMBEDDING,
    FILTER,
    IDS,
    INPUT_IDS,
    QUERY,
    SCORES,
    TEXT,
    TITLES,
    TOP_K,
    encoder_model,
    tokenizer_model,
)
from ecomserve.errors import InvalidInput
from ecomserve.fusion import fuse_embeddings, query_scores
from ecomserve.index.catalog import read_manifest
from ecomserve.index.filters import ItemFilter, parse_filter
from ecomserve.index.loading import load_index
from ecomserve.index.milvus_index import milvus_token
from ecomserve.parameters import SearchParameters
from ecomserve.prompts import PASSAGE_PROMPT, QUERY_PROMPT, with_prompt
from ecomserve.runtime import ENCODER_INPUTS, ENCODER_OUTPUT
from ecomserve.serving_models.base import (
    Unavailable,
    UpstreamError,
    bytes_array,
    input_array,
    model_config,
    output,
    respond_each_async,
)
from ecomserve.spec import SearchSpec
from ecomserve.validation import decode_texts

# How stale the index may be: well inside the 5 s the catalog promises.
MANIFEST_CHECK_S = 0.25
# Triton's words for a model version that is not loaded (BLS errors all arrive as INTERNAL).
_NOT_LOADED = re.compile(r"unknown model|no available versions|is not ready|version \d+ is not", re.IGNORECASE)


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        parameters = SearchParameters.from_config(config)
        self.search = SearchSpec.model_validate(parameters.search)
        folder = Path(self.search.index_dir)
        self.index_dir = folder if folder.is_absolute() else Path(args["model_repository"]).parents[1] / folder
        if self.search.backend == "milvus":
            milvus_token(self.search.milvus, self.index_dir.parent)  # a missing token fails the load, not a request
        self.slices = parameters.encoders
        self.fusion = parameters.fusion
        self.layout = parameters.layout
        self.chunk = parameters.embed_batch
        self.max_text_bytes = parameters.limits["max_text_bytes"]
        self.prompts = parameters.prompts
        self.manifest, self.index, self.titles, self.checked_at = None, None, {}, 0.0
        self.cache = TTLCache(maxsize=max(self.search.cache.size, 1), ttl=self.search.cache.ttl_s)
        self.cache_family = pb_utils.MetricFamily(
            name="ecomserve_search_cache_total",
            description="search results answered from the query cache (hit) or computed (miss)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.hits = self.cache_family.Metric(labels={"model": args["model_name"], "result": "hit"})
        self.misses = self.cache_family.Metric(labels={"model": args["model_name"], "result": "miss"})

    async def execute(self, requests):
        return await respond_each_async(requests, self._handle)

    async def _handle(self, request):
        (query,) = decode_texts(QUERY, input_array(request, QUERY), self.max_text_bytes)
        top_k = self._top_k(request)
        where = self._filter(request)
        self._refresh()
        if self.manifest.passage_prompt != self.prompts.get(PASSAGE_PROMPT, ""):
            raise Unavailable(
                f"the catalog index was embedded with the passage prompt {self.manifest.passage_prompt!r}, the "
                f"spec's is {self.prompts.get(PASSAGE_PROMPT, '')!r}: rebuild it: `ecomserve index build CATALOG`"
            )
        key = (self.manifest.version, self.manifest.release, query, top_k, where.key if where else None)
        found = self.cache.get(key) if self.search.cache.size else None
        if found is None:
            self.misses.increment(1)
            found = await self._search(query, top_k, where)
            if self.search.cache.size:
                self.cache[key] = found
        else:
            self.hits.increment(1)
        ids, scores = found
        # Triton sends only the outputs a request asked for; the HTTP API's /v1/search asks for TITLES.
        titles = bytes_array([self.titles[item] for item in ids])
        return pb_utils.InferenceResponse(
            output_tensors=[
                output(IDS, bytes_array(ids)),
                output(SCORES, np.asarray(scores, np.float32)),
                output(TITLES, titles),
            ]
        )

    def _top_k(self, request) -> int:
        tensor = pb_utils.get_input_tensor_by_name(request, TOP_K)
        if tensor is None:
            return self.search.top_k
        values = tensor.as_numpy().reshape(-1)
        top_k = int(values[0]) if values.size == 1 else -1
        if not 1 <= top_k <= self.search.max_top_k:
            raise InvalidInput(
                f"TOP_K: got {values.tolist()}, expected one value from 1 to {self.search.max_top_k} (search.max_top_k)"
            )
        return top_k

    @staticmethod
    def _filter(request) -> ItemFilter | None:
        tensor = pb_utils.get_input_tensor_by_name(request, FILTER)
        if tensor is None:
            return None
        values = tensor.as_numpy().reshape(-1)
        if values.size != 1:
            raise InvalidInput(f"FILTER: expected one JSON object, got {values.size} values")
        value = values[0]
        return parse_filter(value if isinstance(value, bytes) else str(value))

    def _refresh(self) -> None:
        now = time.monotonic()
        if self.index is not None and now - self.checked_at < MANIFEST_CHECK_S:
            return
        self.checked_at = now
        manifest = read_manifest(self.index_dir)
        if manifest is not None and manifest == self.manifest:
            return
        loaded = load_index(self.search, self.index_dir)
        if loaded is None:
            raise Unavailable(f"no catalog index at {self.index_dir}: run `ecomserve index build CATALOG`")
        self.manifest, self.index, self.titles = loaded
        self.cache.clear()

    async def _search(self, query: str, top_k: int, where: ItemFilter | None) -> tuple[list[str], list[float]]:
        rerank = self.search.rerank
        wanted = max(top_k, rerank.candidates) if rerank.enabled else top_k
        # The query prompt after the checks, on the client's text; the cache is keyed by that text.
        (vector,) = await self._embed(with_prompt(self.prompts, QUERY_PROMPT, [query]))
        # The filter applies inside the index search (min(wanted, matching) hits); rerank reorders only those.
        found = self.index.search(vector[None, :], wanted, where)[0]
        hits = [(item, score) for item, score in found if item in self.titles]
        if not rerank.enabled or not hits:
            return [item for item, _ in hits[:top_k]], [score for _, score in hits[:top_k]]
        # The rank fusion of every encoder over the retrieved titles, embedded by the index's release as
        # passages, as the index build embedded them.
        titles = with_prompt(self.prompts, PASSAGE_PROMPT, [self.titles[item] for item, _ in hits])
        fused = np.concatenate([vector[None, :], await self._embed(titles)])
        _, scores = query_scores(fused, self.slices, self.fusion["mode"], self.fusion["rrf_k"])
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [hits[i][0] for i in order], [float(scores[i]) for i in order]

    async def _embed(self, texts: list[str]) -> np.ndarray:
        chunks = [texts[i : i + self.chunk] for i in range(0, len(texts), self.chunk)]
        return np.concatenate(await asyncio.gather(*(self._embed_chunk(chunk) for chunk in chunks)))

    async def _embed_chunk(self, texts: list[str]) -> np.ndarray:
        text = pb_utils.Tensor(TEXT, bytes_array(texts).reshape(-1, 1))
        if self.layout == "fused":
            return await self._call(EMBEDDER, [text], EMBEDDING)
        vectors = []
        for encoder in self.slices:
            tokens = await self._call(tokenizer_model(encoder.name), [text], INPUT_IDS, ATTENTION_MASK)
            inputs = [pb_utils.Tensor(name, array) for name, array in zip(ENCODER_INPUTS, tokens)]
            vectors.append(await self._call(encoder_model(encoder.name), inputs, ENCODER_OUTPUT))
        return vectors[0] if len(vectors) == 1 else fuse_embeddings(vectors, self.slices)

    async def _call(self, model: str, inputs: list, *outputs: str):
        """One BLS call to `model` at the index's release: its output array, or a tuple of them."""
        release = self.manifest.release
        request = pb_utils.InferenceRequest(
            model_name=model, model_version=release, inputs=inputs, requested_output_names=list(outputs)
        )
        response = await request.async_exec()
        if response.has_error():
            if _NOT_LOADED.search(response.error().message()):
                raise Unavailable(
                    f"the catalog index was embedded by release {release}, which is not loaded ('{model}'); "
                    "rebuild it for the live release: `ecomserve index build CATALOG`"
                )
            raise UpstreamError(response.error())
        arrays = tuple(pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs)
        return arrays[0] if len(arrays) == 1 else arrays
