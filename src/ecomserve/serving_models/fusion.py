"""fusion: per-encoder unit vectors → one fused embedding (see ecomserve.fusion)."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from ecomserve.contract import EMBEDDING
from ecomserve.fusion import fuse_embeddings
from ecomserve.parameters import FusionParameters
from ecomserve.serving_models.base import input_array, model_config, output, respond_each


class TritonPythonModel:
    def initialize(self, args):
        self.slices = FusionParameters.from_config(model_config(args)).encoders

    def execute(self, requests):
        return respond_each(requests, self._fuse)

    def _fuse(self, request):
        parts = [input_array(request, f"EMBEDDING_{i}") for i in range(len(self.slices))]
        return pb_utils.InferenceResponse(output_tensors=[output(EMBEDDING, fuse_embeddings(parts, self.slices))])
