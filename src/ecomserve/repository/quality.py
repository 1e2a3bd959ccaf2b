"""A release's retrieval quality, measured from its files before it may go live.

NDCG@5 on the shipped eval set (export/eval/relevance.json), ranking every product title by the dot
product of fused embeddings — what `rank` computes with weighted_mean fusion — with the same runners
and fusion the server uses, in this process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ecomserve.evaluation import load_eval_set, mean_ndcg
from ecomserve.fusion import EncoderSlice, fuse_embeddings
from ecomserve.repository.builder import BUILD_INFO, encoder_dirs
from ecomserve.runtime import MODEL_FILES, load_runner, run_by_length
from ecomserve.spec import PipelineSpec
from ecomserve.tokenization import TOKENIZER_FILE, TextTokenizer


def release_ndcg(repository: Path, release: int, spec: PipelineSpec | None = None) -> float:
    """NDCG@5 of `release` in `repository`; `spec` defaults to the one the repository was built from."""
    if spec is None:
        spec = PipelineSpec.model_validate(json.loads((repository / BUILD_INFO).read_text())["spec"])
    embed = _embedder(repository, str(release), spec)
    eval_set = load_eval_set()
    titles = embed(eval_set.titles)
    queries = embed([q.text for q in eval_set.queries])
    by_query = {q.text: vector for q, vector in zip(eval_set.queries, queries)}
    return mean_ndcg(eval_set, lambda query, _items: titles @ by_query[query])


def _embedder(repository: Path, version: str, spec: PipelineSpec):
    encoders = []
    for encoder in spec.encoders:
        tokenizer_dir, model_dir = encoder_dirs(spec.serving.layout, encoder, repository, version)
        tokenizer = TextTokenizer(tokenizer_dir / TOKENIZER_FILE, encoder.max_seq_len)
        encoders.append((encoder, tokenizer, load_runner(encoder.runtime, model_dir / MODEL_FILES[encoder.runtime], 2)))

    def embed(texts: list[str]) -> np.ndarray:
        vectors, slices = [], []
        for encoder, tokenizer, run in encoders:
            batch = tokenizer.encode(texts)
            vectors.append(run_by_length(run, batch.input_ids, batch.attention_mask))
            slices.append(EncoderSlice(encoder.name, vectors[-1].shape[1], encoder.weight))
        return fuse_embeddings(vectors, slices)

    return embed
