"""CPU runtimes that run an exported encoder: ONNX Runtime or OpenVINO, behind one call.

The served encoder model, the parity checks and the benchmark's in-process contender all run
encoders through `load_runner`, so what is measured in-process is what is served."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

Runtime = Literal["onnxruntime", "openvino"]
# (input_ids [batch, seq] int64, attention_mask [batch, seq] int64) → unit vectors [batch, dim] fp32
Runner = Callable[[np.ndarray, np.ndarray], np.ndarray]

MODEL_FILES = {"onnxruntime": "model.onnx", "openvino": "model.xml"}


def load_runner(runtime: Runtime, path: Path, threads: int = 1) -> Runner:
    if runtime == "onnxruntime":
        return _onnxruntime_runner(path, threads)
    if runtime == "openvino":
        return _openvino_runner(path, threads)
    raise ValueError(f"unknown runtime {runtime!r}")


def _onnxruntime_runner(path: Path, threads: int) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    return run


def _openvino_runner(path: Path, threads: int) -> Runner:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        str(path),
        "CPU",
        {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            # Keep fp32 activations on CPUs with bf16/fp16 support, so answers match the reference.
            "INFERENCE_PRECISION_HINT": "f32",
        },
    )
    request = compiled.create_infer_request()

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        result = request.infer({"input_ids": input_ids, "attention_mask": attention_mask})
        return np.array(result[compiled.output(0)], dtype=np.float32)

    return run


# Texts run in chunks of similar length: a batch of product titles padded to its longest title spends
# much of its compute on [PAD]; the benchmark's "titles/s" columns include this.
LENGTH_CHUNK = 8


def run_by_length(run: Runner, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """`run` over a padded batch, shortest texts first, each chunk cut to its own longest text.
    Padding is masked inside the graph, so every answer is the same as in any other batch."""
    lengths = attention_mask.sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    vectors: np.ndarray | None = None
    for start in range(0, len(order), LENGTH_CHUNK):
        rows = order[start : start + LENGTH_CHUNK]
        width = int(lengths[rows].max())
        chunk = run(input_ids[rows, :width], attention_mask[rows, :width])
        if vectors is None:
            vectors = np.empty((len(order), chunk.shape[1]), dtype=np.float32)
        vectors[rows] = chunk
    return vectors
