"""<name>_encoder (ensemble layout): token ids → unit vectors, the whole dynamic batch in one run.

Requests arrive with their own sequence lengths (ragged batching); they are padded to the longest
and run together. Padding is masked out inside the graph, so each answer is independent of its batch."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from ecomserve.parameters import EncoderParameters
from ecomserve.runtime import ENCODER_INPUTS, ENCODER_OUTPUT
from ecomserve.serving_models.base import error_response, input_array, model_config, output, version_dir
from ecomserve.serving_models.cpu_share import InstanceCpu, load_runners


def _pad(arrays: list[np.ndarray], length: int) -> np.ndarray:
    return np.concatenate([np.pad(a, ((0, 0), (0, length - a.shape[1]))) for a in arrays])


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        parameters = EncoderParameters.from_config(config)
        path = version_dir(args) / parameters.model_file
        self.runners = load_runners(
            parameters.runtime, path, parameters.intra_op_threads, parameters.idle_threads, parameters.device
        )
        self.cpu = InstanceCpu(config, args["model_instance_name"], parameters, [self.runners])

    def execute(self, requests):
        try:
            ids = [input_array(r, ENCODER_INPUTS[0]) for r in requests]
            masks = [input_array(r, ENCODER_INPUTS[1]) for r in requests]
            length = max(a.shape[1] for a in ids)
            with self.cpu.running():
                embeddings = self.cpu.run(self.runners, _pad(ids, length), _pad(masks, length))
        except Exception as exc:  # noqa: BLE001 - the whole batch failed together
            return [error_response(exc) for _ in requests]
        bounds = np.cumsum([a.shape[0] for a in ids])[:-1]
        return [
            pb_utils.InferenceResponse(output_tensors=[output(ENCODER_OUTPUT, part)])
            for part in np.split(embeddings, bounds)
        ]
