"""The PyTorch reference: a Hugging Face encoder plus sentence-transformers pooling and L2 normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel


def load_encoder(model_dir: Path, keep_layers: int | None, layer_indices: Sequence[int] | None = None) -> nn.Module:
    """Load an HF encoder for export, pruned to its first `keep_layers` layers or to the layers in
    `layer_indices` (0-based, e.g. [0, 4, 5]: keeping the last layer keeps the output space, the first N do not)."""
    # transformers 5 picks SDPA by default, which the TorchScript ONNX exporter cannot trace.
    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager")
    layers = model.encoder.layer
    if keep_layers is not None and layer_indices is not None:
        raise ValueError("keep_layers and layer_indices both choose the kept layers: pass one")
    if keep_layers is not None:
        if keep_layers > len(layers):
            raise ValueError(f"keep_layers={keep_layers} but the model has only {len(layers)} layers")
        layer_indices = range(keep_layers)
    if layer_indices is not None:
        missing = [i for i in layer_indices if not 0 <= i < len(layers)]
        if missing:
            raise ValueError(f"layer_indices {missing} but the model has only {len(layers)} layers")
        model.encoder.layer = nn.ModuleList(layers[i] for i in layer_indices)
        model.config.num_hidden_layers = len(model.encoder.layer)
    return model.eval()


class PooledEncoder(nn.Module):
    """(input_ids, attention_mask) → L2-normalised sentence embedding, as sentence-transformers computes it."""

    def __init__(self, encoder: nn.Module, pooling: Literal["mean", "cls"]):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        # Inference only; torch.onnx.export restores the wrapper's mode afterwards, so it must be eval too.
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # A ready 4-D additive mask is used as-is by transformers; its own 2-D mask handling branches on
        # the data (no padding → no mask), which a trace would freeze into the ONNX graph.
        dtype = next(self.encoder.parameters()).dtype
        blocked = (1 - attention_mask[:, None, None, :]).to(dtype)
        hidden = self.encoder(
            input_ids=input_ids,
            attention_mask=blocked * torch.finfo(dtype).min,
            token_type_ids=torch.zeros_like(input_ids),
        ).last_hidden_state
        # Pooling sums up to max_seq_len vectors and normalising squares them: fp32, whatever the encoder ran in.
        hidden = hidden.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


@torch.inference_mode()
def reference_embeddings(model: PooledEncoder, input_ids, attention_mask) -> torch.Tensor:
    return model(torch.as_tensor(input_ids), torch.as_tensor(attention_mask))
