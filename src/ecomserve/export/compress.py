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


def _sensitive_matmuls(path: Path) -> list[str]:
    """MatMuls that stay fp32 under static INT8: those multiplying two activations (attention scores
    and context, whose ranges vary per input) and the feed-forward output projection, whose input
    after GELU has outliers that one calibrated scale cannot cover (cosine 0.89 → 0.98 on MiniLM)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    sensitive = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        two_activations = not any(name in constants for name in node.input)
        # Node names follow the Hugging Face module path (TorchScript exporter): layer.N/output/dense.
        feed_forward_out = "/output/dense/" in node.name and "/attention/" not in node.name
        if two_activations or feed_forward_out:
            sensitive.append(node.name)
    return sensitive


def quantize_static_onnx(
    source: Path, target: Path, batches: list[dict[str, np.ndarray]], reduce_range: bool = False
) -> Path:
    """Static (calibrated) QDQ INT8, so every answer is independent of its batch. `reduce_range`: 7-bit weights,
    for CPUs without VNNI, where full-range u8 × s8 products can overflow the 16-bit sums of the AVX2 kernels."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(source),
        str(target),
        CalibrationReader(batches),
        quant_format=QuantFormat.QDQ,
        # MatMuls carry nearly all the compute; LayerNorm, Softmax and pooling stay fp32.
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=_sensitive_matmuls(source),
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    return target


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
