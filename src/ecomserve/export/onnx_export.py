"""Write a PooledEncoder as ONNX (opset 17, dynamic batch and sequence axes)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ecomserve.export.pooled_encoder import PooledEncoder

OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"


def dummy_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A batch to trace with; its padded row keeps the traced graph honest about masking."""
    input_ids = torch.full((2, 8), 100, dtype=torch.int64)
    attention_mask = torch.ones((2, 8), dtype=torch.int64)
    attention_mask[1, 5:] = 0
    return input_ids, attention_mask


def export_onnx(model: PooledEncoder, path: Path) -> None:
    input_ids, attention_mask = dummy_inputs()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter is the one that handles these models (transformers 5); its deprecation
    # and tracer notes are expected and would only bury the build's own progress output.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        torch.onnx.export(
            model,
            (input_ids, attention_mask),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                OUTPUT_NAME: {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    _fix_embedding_width(path, model.encoder.config.hidden_size)


def _fix_embedding_width(path: Path, width: int) -> None:
    """The tracer leaves the output's width symbolic; Triton's GPU backends check it against the config."""
    import onnx

    graph_model = onnx.load(str(path))
    dim = graph_model.graph.output[0].type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_value = width
    onnx.save(graph_model, str(path))
