"""<name>_tokenizer: TEXT → INPUT_IDS, ATTENTION_MASK, validating every text first."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from ecomserve.contract import ATTENTION_MASK, INPUT_IDS, TEXT
from ecomserve.parameters import TokenizerParameters
from ecomserve.serving_models.base import input_array, model_config, output, respond_each, version_dir
from ecomserve.tokenization import TOKENIZER_FILE, TextTokenizer
from ecomserve.validation import decode_texts


def truncation_counter(model_name: str):
    """The counter of texts cut at max_seq_len; the family must outlive its metric, so both are returned."""
    family = pb_utils.MetricFamily(
        name="ecomserve_truncated_texts_total",
        description="Texts cut at max_seq_len tokens by the tokenizer",
        kind=pb_utils.MetricFamily.COUNTER,
    )
    return family, family.Metric(labels={"model": model_name})


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        parameters = TokenizerParameters.from_config(config)
        self.max_text_bytes, self.prompt_bytes = parameters.max_text_bytes, parameters.prompt_bytes
        self.tokenizer = TextTokenizer(
            version_dir(args) / TOKENIZER_FILE,
            parameters.max_seq_len,
            parameters.pad_to_multiple,
        )
        self.truncation_family, self.truncated = truncation_counter(args["model_name"])

    def execute(self, requests):
        return respond_each(requests, self._tokenize)

    def _tokenize(self, request):
        texts = decode_texts(TEXT, input_array(request, TEXT).reshape(-1), self.max_text_bytes, self.prompt_bytes)
        batch = self.tokenizer.encode(texts)
        if batch.truncated:
            self.truncated.increment(batch.truncated)
        return pb_utils.InferenceResponse(
            output_tensors=[output(INPUT_IDS, batch.input_ids), output(ATTENTION_MASK, batch.attention_mask)]
        )
