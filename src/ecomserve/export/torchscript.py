"""Write a PooledEncoder as TorchScript for the torch runtime.

The python backend's stub cannot import transformers here (its Python lacks the `ssl` symbols that
huggingface_hub needs), so the served torch encoder is a traced graph that needs torch alone. The
trace is taken per dtype: a graph traced in fp32 casts to fp32 inside attention, so fp16 has its own."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from ecomserve.export.onnx_export import dummy_inputs
from ecomserve.export.pooled_encoder import PooledEncoder


def export_torchscript(model: PooledEncoder, path: Path, half: bool) -> None:
    traced_from = copy.deepcopy(model).half() if half else model
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(traced_from, dummy_inputs(), check_trace=False)
    torch.jit.save(traced, str(path))
