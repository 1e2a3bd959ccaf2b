"""Check an exported encoder against the PyTorch reference on a fixed text set."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ecomserve.errors import ExportError
from ecomserve.export.pooled_encoder import PooledEncoder, reference_embeddings
from ecomserve.tokenization import TextTokenizer

# fp32 export must reproduce PyTorch; compressed variants set their own bar.
FP32_MIN_COSINE = 0.9999


@dataclass(frozen=True)
class ParityReport:
    texts: int
    min_cosine: float
    max_abs_diff: float


def parity_texts() -> list[str]:
    text = resources.files("ecomserve.export").joinpath("parity_texts.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def check_parity(
    onnx_path: Path,
    reference: PooledEncoder,
    tokenizer: TextTokenizer,
    encoder_name: str,
    min_cosine: float = FP32_MIN_COSINE,
) -> ParityReport:
    import onnxruntime as ort

    texts = parity_texts()
    batch = tokenizer.encode(texts)
    expected = reference_embeddings(reference, batch.input_ids, batch.attention_mask).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    cosines = np.sum(expected * actual, axis=1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1))
    report = ParityReport(len(texts), float(cosines.min()), float(np.abs(expected - actual).max()))
    if report.min_cosine < min_cosine:
        worst = texts[int(cosines.argmin())]
        raise ExportError(
            f"encoder '{encoder_name}': ONNX output differs from PyTorch: min cosine {report.min_cosine:.6f} "
            f"< {min_cosine} (worst text: {worst!r}). Check encoders[].source and encoders[].precision; "
            "the ONNX file was not published."
        )
    return report
