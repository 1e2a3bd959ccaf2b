"""Check an exported encoder against the PyTorch reference on a fixed text set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ecomserve.errors import ExportError
from ecomserve.export.pooled_encoder import PooledEncoder, reference_embeddings
from ecomserve.paths import parity_texts
from ecomserve.runtime import Runner
from ecomserve.tokenization import TextTokenizer

# The lowest cosine to PyTorch each precision may reach on any parity text. fp32 must reproduce
# PyTorch; INT8 keeps LayerNorm, Softmax and pooling in fp32 and loses a little in the MatMuls.
# fp16 (torch on CUDA, TensorRT) is held to 0.999.
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.97}


@dataclass(frozen=True)
class ParityReport:
    stage: str
    texts: int
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float


def check_parity(
    runner: Runner,
    reference: PooledEncoder,
    tokenizer: TextTokenizer,
    encoder_name: str,
    stage: str,
    min_cosine: float,
) -> ParityReport:
    texts = parity_texts()
    batch = tokenizer.encode(texts)
    expected = reference_embeddings(reference, batch.input_ids, batch.attention_mask).numpy()
    actual = runner(batch.input_ids, batch.attention_mask)
    cosines = np.sum(expected * actual, axis=1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1))
    report = ParityReport(
        stage, len(texts), float(cosines.min()), float(cosines.mean()), float(np.abs(expected - actual).max())
    )
    if report.min_cosine < min_cosine:
        worst = texts[int(cosines.argmin())]
        raise ExportError(
            f"encoder '{encoder_name}' ({stage}): output differs from PyTorch: min cosine {report.min_cosine:.6f} "
            f"< {min_cosine} (worst text: {worst!r}). Check encoders[].source, precision and runtime; "
            "nothing was published."
        )
    return report
