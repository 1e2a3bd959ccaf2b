"""<name>_encoder on the CPU target: ONNX Runtime over the whole dynamic batch in one run.

Requests arrive with their own sequence lengths (ragged batching); they are padded to the longest
and run together. Padding is masked out inside the graph, so each answer is independent of its batch."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from ecomserve.serving_models.base import error_response, input_array, model_config, output, parameter, version_dir


def _pad(arrays: list[np.ndarray], length: int) -> np.ndarray:
    return np.concatenate([np.pad(a, ((0, 0), (0, length - a.shape[1]))) for a in arrays])


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        options = ort.SessionOptions()
        options.intra_op_num_threads = parameter(config, "intra_op_threads")
        options.inter_op_num_threads = 1
        onnx_path = version_dir(args) / parameter(config, "onnx_file")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        try:
            ids = [input_array(r, "INPUT_IDS") for r in requests]
            masks = [input_array(r, "ATTENTION_MASK") for r in requests]
            length = max(a.shape[1] for a in ids)
            (embeddings,) = self.session.run(
                None, {"input_ids": _pad(ids, length), "attention_mask": _pad(masks, length)}
            )
        except Exception as exc:  # noqa: BLE001 - the whole batch failed together
            return [error_response(exc) for _ in requests]
        bounds = np.cumsum([a.shape[0] for a in ids])[:-1]
        return [
            pb_utils.InferenceResponse(output_tensors=[output("EMBEDDING", part)])
            for part in np.split(embeddings, bounds)
        ]
