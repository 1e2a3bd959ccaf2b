"""embedder (fused layout; `embed` is an ensemble in front of it): TEXT → validated → tokenized →
every encoder → fused EMBEDDING, in one model.

One hop instead of an ensemble of tokenizer, encoder and fusion models. All valid texts of a
dynamic batch go through each encoder in one run; a bad text fails only its own request."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from ecomserve.contract import EMBEDDING, TEXT
from ecomserve.fusion import fuse_embeddings
from ecomserve.parameters import EmbedderParameters
from ecomserve.serving_models.base import (
    error_response,
    input_array,
    model_config,
    output,
    version_dir,
)
from ecomserve.serving_models.cpu_share import InstanceCpu, load_runners
from ecomserve.serving_models.tokenizer import truncation_counter
from ecomserve.tokenization import TOKENIZER_FILE, TextTokenizer
from ecomserve.validation import decode_texts


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        parameters = EmbedderParameters.from_config(config)
        threads, device = parameters.intra_op_threads, parameters.device
        self.max_text_bytes, self.prompt_bytes = parameters.max_text_bytes, parameters.prompt_bytes
        self.slices = parameters.slices
        self.encoders = []
        for encoder in parameters.encoders:
            files = version_dir(args) / encoder.name
            tokenizer = TextTokenizer(files / TOKENIZER_FILE, encoder.max_seq_len)
            runners = load_runners(
                encoder.runtime, files / encoder.model_file, threads, parameters.idle_threads, device
            )
            self.encoders.append((tokenizer, runners))
        all_runners = [runners for _, runners in self.encoders]
        self.cpu = InstanceCpu(config, args["model_instance_name"], parameters, all_runners)
        self.truncation_family, self.truncated = truncation_counter(args["model_name"])

    def execute(self, requests):
        responses: list = [None] * len(requests)
        texts: list[str] = []
        owners: list[tuple[int, int, int]] = []  # (request index, first text, end)
        for index, request in enumerate(requests):
            try:
                decoded = decode_texts(
                    TEXT, input_array(request, TEXT).reshape(-1), self.max_text_bytes, self.prompt_bytes
                )
            except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                responses[index] = error_response(exc)
                continue
            owners.append((index, len(texts), len(texts) + len(decoded)))
            texts += decoded
        if texts:
            try:
                fused = self._embed(texts)
                for index, start, end in owners:
                    responses[index] = pb_utils.InferenceResponse(output_tensors=[output(EMBEDDING, fused[start:end])])
            except Exception as exc:  # noqa: BLE001 - the encoders failed for the whole batch
                for index, _, _ in owners:
                    responses[index] = error_response(exc)
        return responses

    def _embed(self, texts: list[str]) -> np.ndarray:
        vectors = []
        with self.cpu.running():
            for tokenizer, runners in self.encoders:
                batch = tokenizer.encode(texts)
                if batch.truncated:
                    self.truncated.increment(batch.truncated)
                vectors.append(self.cpu.run(runners, batch.input_ids, batch.attention_mask))
        return vectors[0] if len(vectors) == 1 else fuse_embeddings(vectors, self.slices)
