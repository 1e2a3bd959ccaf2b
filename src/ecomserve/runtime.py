"""Runtimes that run an exported encoder inside the python backend, behind one call: ONNX Runtime or
OpenVINO on CPU, or PyTorch on CUDA (fp16) or CPU.

The served encoder model, the parity checks and the benchmark's in-process contender all run
encoders through `load_runner`, so what is measured in-process is what is served."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

Runtime = Literal["onnxruntime", "openvino", "torch"]
Device = Literal["cpu", "cuda", "auto"]
# (input_ids [batch, seq] int64, attention_mask [batch, seq] int64) → unit vectors [batch, dim] fp32
Runner = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Every encoder, whatever runs it, has the exported ONNX graph's tensor names.
ENCODER_INPUTS = ("input_ids", "attention_mask")
ENCODER_OUTPUT = "embedding"
MODEL_FILES = {"onnxruntime": "model.onnx", "openvino": "model.xml", "torch": "model.pt"}
# A torch encoder verified in fp16 also has this trace, run when CUDA is there.
TORCH_FP16_FILE = "model_fp16.pt"

log = logging.getLogger("ecomserve.runtime")


def load_runner(runtime: Runtime, path: Path, threads: int = 1, device: Device = "cpu") -> Runner:
    if runtime == "onnxruntime":
        return _onnxruntime_runner(path, threads)
    if runtime == "openvino":
        return _openvino_runner(path, threads)
    if runtime == "torch":
        chosen = select_device(device)
        half = path.with_name(TORCH_FP16_FILE)
        if half.is_file() and chosen == "cpu":
            # fp16 matmuls on CPU are emulated and slower than fp32; the answers stay within the fp16 bar.
            log.warning("encoder %s: fp16 needs CUDA; running fp32 on CPU", path.parent.name)
        return torch_runner(half if half.is_file() and chosen == "cuda" else path, chosen, threads)
    raise ValueError(f"unknown runtime {runtime!r}")


def select_device(requested: Device) -> str:
    """cuda when asked for and present; auto falls back to CPU with a warning, cuda refuses to."""
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    reason = f"torch {torch.__version__} sees no CUDA device (a CPU-only build, or no GPU visible to this process)"
    if requested == "cuda":
        raise RuntimeError(
            f"serving.device is cuda but {reason}: install a CUDA build of torch on a GPU machine, "
            "or set serving.device: auto (falls back to CPU) or cpu"
        )
    log.warning("serving.device auto: %s; running on CPU", reason)
    return "cpu"


def torch_runner(path: Path, device: str, threads: int = 1) -> Runner:
    """The traced PyTorch reference (export/torchscript.py) on `device`; fp16 traces pool in fp32."""
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    model = torch.jit.load(str(path), map_location=device)

    @torch.inference_mode()
    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(input_ids).to(device, non_blocking=True)
        mask = torch.from_numpy(attention_mask).to(device, non_blocking=True)
        return model(ids, mask).float().cpu().numpy()

    return run


# ORT graph fusions left out (`onnxruntime_options`).
UNFUSED = "SkipLayerNormFusion;BiasGeluFusion"


def onnxruntime_options(threads: int):
    """The session options every ecomserve ONNX Runtime session runs with (server, parity checks, benchmark)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # The pool spins while a run is in progress (waking threads through the OS costs more than a short
    # query: 4.5 ms against 3.1 at 2 threads), but not after it returns: left spinning between requests it
    # burns the cores the other instances and the next request need (11 ms of CPU per 3 ms query, measured).
    options.add_session_config_entry("session.force_spinning_stop", "1")
    # ORT's fused SkipLayerNormalization and BiasGelu CPU kernels run slower than the Add, LayerNormalization
    # and Gelu they replace: without the two fusions the INT8 student ran 7–17% faster from one query to 32
    # titles, the INT8 teacher 6–16% from 4 queries up (even at one), and the served student answered 11% more
    # queries at 16 clients (2026-12-02, AMD EPYC, AVX-512 VNNI; README "Compression variants").
    options.add_session_config_entry("optimization.disable_specified_optimizers", UNFUSED)
    return options


def _onnxruntime_runner(path: Path, threads: int) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), onnxruntime_options(threads), providers=["CPUExecutionProvider"])

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
