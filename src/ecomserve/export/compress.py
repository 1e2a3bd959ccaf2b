"""Compressed variants of an exported fp32 encoder, each written beside it.

- ONNX Runtime's transformer fusions (attention, LayerNorm, GELU): exact in fp32.
- INT8 static quantization (QDQ) with activation scales calibrated on shipped text: the scales are
  fixed, so an answer does not depend on what else is in the batch.
- INT8 dynamic quantization: scales computed per batch, so answers depend on the batch; the
  benchmark reports it, the repository refuses to serve it.
- OpenVINO IR in fp32, and INT8 through NNCF's calibrated post-training quantization."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ecomserve.tokenization import TextTokenizer

CALIBRATION_BATCH = 16


def calibration_batches(tokenizer: TextTokenizer, texts: list[str]) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(texts), CALIBRATION_BATCH):
        batch = tokenizer.encode(texts[start : start + CALIBRATION_BATCH])
        yield {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


def optimize_onnx(source: Path, target: Path, num_heads: int, hidden_size: int) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(
        str(source), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=1, use_gpu=False
    )
    model.save_model_to_file(str(target))
    return target


class CalibrationReader:
    """onnxruntime.quantization's CalibrationDataReader protocol over tokenized batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _matmuls_left_out(path: Path) -> tuple[list[str], list[str]]:
    """The MatMuls one calibrated activation scale does not suit: those multiplying two activations (attention
    scores and context, whose ranges vary per input; they stay fp32), and the feed-forward output projections,
    whose input after GELU has outliers (per-token INT8 instead, export/per_token.py; statically quantized they
    drop MiniLM's min cosine to 0.89, the 3-layer student's to 0.950)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    two_activations, feed_forward_out = [], []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        if not any(name in constants for name in node.input):
            two_activations.append(node.name)
        # Node names follow the Hugging Face module path (TorchScript exporter): layer.N/output/dense.
        elif "/output/dense/" in node.name and "/attention/" not in node.name and node.input[1] in constants:
            feed_forward_out.append(node.name)
    return two_activations, feed_forward_out


def quantize_static_onnx(
    source: Path, target: Path, batches: list[dict[str, np.ndarray]], reduce_range: bool = False
) -> Path:
    """Static (calibrated) QDQ INT8, the feed-forward outputs per-token INT8, so every answer is independent of its
    batch. `reduce_range`: 7-bit weights, for CPUs without VNNI, where full-range u8 × s8 products can overflow
    the 16-bit sums of the AVX2 kernels."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from ecomserve.export.per_token import per_token_matmuls

    two_activations, feed_forward_out = _matmuls_left_out(source)
    quantize_static(
        str(source),
        str(target),
        CalibrationReader(batches),
        quant_format=QuantFormat.QDQ,
        # MatMuls carry nearly all the compute; LayerNorm, Softmax and pooling stay fp32.
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=two_activations + feed_forward_out,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    return per_token_matmuls(target, target, feed_forward_out, reduce_range)


def quantize_dynamic_onnx(source: Path, target: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source), str(target), op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8
    )
    return target


def to_openvino(source: Path, target: Path, batches: list[dict[str, np.ndarray]] | None = None) -> Path:
    """ONNX → OpenVINO IR (target is the .xml); INT8 through NNCF when calibration batches are given."""
    import openvino as ov

    model = ov.convert_model(str(source))
    if batches is not None:
        import nncf

        model = nncf.quantize(
            model,
            nncf.Dataset(batches),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=sum(len(b["input_ids"]) for b in batches),
            preset=nncf.QuantizationPreset.MIXED,
        )
    ov.save_model(model, str(target), compress_to_fp16=False)
    return target
