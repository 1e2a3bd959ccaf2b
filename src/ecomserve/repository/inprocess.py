"""The fused embedding of one release, computed in this process from the release's files with the
same tokenizers, runners and fusion the server uses (the publish quality gate, catalog indexing)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ecomserve.fusion import EncoderSlice, fuse_embeddings
from ecomserve.repository.builder import encoder_dirs
from ecomserve.runtime import MODEL_FILES, load_runner, run_by_length
from ecomserve.spec import PipelineSpec
from ecomserve.tokenization import TOKENIZER_FILE, TextTokenizer


def release_embedder(repository: Path, release: int, spec: PipelineSpec) -> Callable[[list[str]], np.ndarray]:
    encoders = []
    for encoder in spec.encoders:
        tokenizer_dir, model_dir = encoder_dirs(spec.serving.layout, encoder, repository, str(release))
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
