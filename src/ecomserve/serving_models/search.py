"""search: QUERY (+ optional TOP_K, FILTER, MODE) → IDS, SCORES (and the items' TITLES) from the catalog index.
FILTER (ecomserve.index.filters) is applied inside the index search, dense and lexical; the result cache is keyed
by it and by MODE too.

MODE (default: the spec's search.mode) picks the retriever: `dense` (the query's vector against the items'),
`lexical` (BM25 over title, brand, description and attribute values, ecomserve.index.lexical; SCORES are BM25
scores) or `hybrid` (the default): both retrievers' top `search.fusion.candidates` fused
(ecomserve.fusion.fuse_rankings; RRF by default, lexical weighted by whether the query has a number in it),
SCORES the fused scores. The optional rerank stage applies to `dense` only.

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
    IDS,
    INPUT_IDS,
    MODE,
    QUERY,
    SCORES,
    TEXT,
    TITLES,
    encoder_model,
    tokenizer_model,
)
from ecomserve.errors import InvalidInput
from ecomserve.fusion import fuse_embeddings, fuse_hybrid, query_scores
from ecomserve.index.catalog import read_manifest
from ecomserve.index.filters import ItemFilter
from ecomserve.index.lexical import LexicalRetriever
from ecomserve.index.loading import MANIFEST_CHECK_S, load_search_index
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
from ecomserve.serving_models.catalog_inputs import filter_input, top_k_input
from ecomserve.spec import SearchSpec
from ecomserve.validation import decode_texts

# Triton's words for a model version that is not loaded (BLS errors all arrive as INTERNAL).
_NOT_LOADED = re.compile(r"unknown model|no available versions|is not ready|version \d+ is not", re.IGNORECASE)
MODES = ("hybrid", "dense", "lexical")


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
        self.lexical: LexicalRetriever | None = None
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
        top_k = top_k_input(request, self.search)
        where = filter_input(request)
        mode = self._mode(request)
        self._refresh()
        if self.manifest.passage_prompt != self.prompts.get(PASSAGE_PROMPT, ""):
            raise Unavailable(
                f"the catalog index was embedded with the passage prompt {self.manifest.passage_prompt!r}, the "
                f"spec's is {self.prompts.get(PASSAGE_PROMPT, '')!r}: rebuild it: `ecomserve index build CATALOG`"
            )
        key = (self.manifest.version, self.manifest.release, query, top_k, where.key if where else None, mode)
        found = self.cache.get(key) if self.search.cache.size else None
        if found is None:
            self.misses.increment(1)
            found = await self._search(query, top_k, where, mode)
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

    def _mode(self, request) -> str:
        tensor = pb_utils.get_input_tensor_by_name(request, MODE)
        if tensor is None:
            return self.search.mode
        values = tensor.as_numpy().reshape(-1)
        if values.size != 1:
            raise InvalidInput(f"MODE: expected one of {', '.join(MODES)}, got {values.size} values")
        value = values[0]
        mode = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        if mode not in MODES:
            raise InvalidInput(f"MODE: unknown mode {mode[:40]!r}; use one of {', '.join(MODES)}")
        return mode

    def _refresh(self) -> None:
        now = time.monotonic()
        if self.index is not None and now - self.checked_at < MANIFEST_CHECK_S:
            return
        self.checked_at = now
        manifest = read_manifest(self.index_dir)
        if manifest is not None and manifest == self.manifest:
            return
        loaded = load_search_index(self.search, self.index_dir)
        if loaded is None:
            raise Unavailable(f"no catalog index at {self.index_dir}: run `ecomserve index build CATALOG`")
        self.manifest, self.index, self.titles, self.lexical = loaded
        self.cache.clear()

    async def _search(
        self, query: str, top_k: int, where: ItemFilter | None, mode: str
    ) -> tuple[list[str], list[float]]:
        if mode == "dense" or (mode == "hybrid" and self.lexical is None):  # hybrid on an index without BM25
            return await self._dense(query, top_k, where)
        if self.lexical is None:
            raise Unavailable(
                "the catalog index has no lexical (BM25) part (written before lexical search): rebuild it: "
                "`ecomserve index build CATALOG`"
            )
        fusion = self.search.fusion
        wanted = top_k if mode == "lexical" else fusion.candidates_for(top_k)
        lexical = [hit for hit in self.lexical.search(query, wanted, where) if hit[0] in self.titles]
        if mode == "lexical":
            return [item for item, _ in lexical], [score for _, score in lexical]
        (vector,) = await self._embed(with_prompt(self.prompts, QUERY_PROMPT, [query]))
        dense = [hit for hit in self.index.search(vector[None, :], wanted, where)[0] if hit[0] in self.titles]
        fused = fuse_hybrid(query, lexical, dense, fusion, top_k)
        return [item for item, _ in fused], [score for _, score in fused]

    async def _dense(self, query: str, top_k: int, where: ItemFilter | None) -> tuple[list[str], list[float]]:
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
