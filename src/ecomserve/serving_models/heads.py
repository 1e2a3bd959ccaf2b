"""rank and classify: BLS models that embed one text plus a list through `embed`, then score.

Both go through the public `embed` ensemble, so they share its batching, cache and version."""

from __future__ import annotations

import asyncio
from functools import partial

import numpy as np
import triton_python_backend_utils as pb_utils

from ecomserve.contract import CANDIDATES, EMBED, EMBEDDING, ENCODER_SCORES, LABEL, LABELS, QUERY, SCORES, TEXT, VOTES
from ecomserve.fusion import query_scores, vote
from ecomserve.parameters import FusionParameters
from ecomserve.prompts import PASSAGE_PROMPT, QUERY_PROMPT, with_prompt
from ecomserve.serving_models.base import (
    UpstreamError,
    bytes_array,
    exec_bls,
    input_array,
    model_config,
    output,
    respond_each_async,
)
from ecomserve.validation import check_count, decode_texts


class _HeadModel:
    """Validates (single text, list) inputs, embeds them in parallel chunks, scores per encoder."""

    single_input: str
    list_input: str
    list_limit: str  # key in limits
    # Which prompts (ecomserve.prompts) go before the single text and the list's texts; None: none.
    single_prompt: str | None = None
    list_prompt: str | None = None

    def initialize(self, args):
        config = model_config(args)
        parameters = FusionParameters.from_config(config)
        self.slices = parameters.encoders
        self.fusion = parameters.fusion
        self.voting = parameters.voting
        self.limits = parameters.limits
        self.chunk = parameters.embed_batch
        self.prompts = parameters.prompts

    async def execute(self, requests):
        return await respond_each_async(requests, self._handle)

    async def _handle(self, request):
        max_bytes = self.limits["max_text_bytes"]
        # Triton has already checked dtypes and shapes against the config: both inputs are 1-D BYTES.
        single = decode_texts(self.single_input, input_array(request, self.single_input), max_bytes)
        items = input_array(request, self.list_input)
        check_count(self.list_input, len(items), self.limits[self.list_limit], self.list_limit)
        items = decode_texts(self.list_input, items, max_bytes)
        # Limits apply to the client's texts: the prompts come after the checks (embed allows their room).
        prompted = with_prompt(self.prompts, self.single_prompt, single)
        fused = await self._embed(prompted + with_prompt(self.prompts, self.list_prompt, items))
        scores, fused_scores = query_scores(fused, self.slices, self.fusion["mode"], self.fusion["rrf_k"])
        return pb_utils.InferenceResponse(output_tensors=self.outputs(items, scores, fused_scores))

    async def _embed(self, texts: list[str]) -> np.ndarray:
        chunks = [texts[i : i + self.chunk] for i in range(0, len(texts), self.chunk)]
        responses = await asyncio.gather(*(exec_bls(partial(self._embed_request, chunk)) for chunk in chunks))
        parts = []
        for response in responses:
            if response.has_error():
                raise UpstreamError(response.error())
            parts.append(pb_utils.get_output_tensor_by_name(response, EMBEDDING).as_numpy())
        return np.concatenate(parts)

    @staticmethod
    def _embed_request(texts: list[str]):
        return pb_utils.InferenceRequest(
            model_name=EMBED,
            inputs=[pb_utils.Tensor(TEXT, bytes_array(texts).reshape(-1, 1))],
            requested_output_names=[EMBEDDING],
        )

    def outputs(self, items: list[str], scores: np.ndarray, fused: np.ndarray) -> list:
        raise NotImplementedError


class RankModel(_HeadModel):
    """QUERY + CANDIDATES → SCORES (fused, input order) and ENCODER_SCORES [encoders, candidates]."""

    single_input, list_input, list_limit = QUERY, CANDIDATES, "max_candidates"
    single_prompt, list_prompt = QUERY_PROMPT, PASSAGE_PROMPT

    def outputs(self, items, scores, fused):
        return [output(SCORES, fused), output(ENCODER_SCORES, scores)]


class ClassifyModel(_HeadModel):
    """TEXT + LABELS → LABEL (vote of the encoders), VOTES per label, SCORES (fused) per label.

    No prompts: a text and its labels are neither a query nor passages (the pipeline's prompts are for retrieval)."""

    single_input, list_input, list_limit = TEXT, LABELS, "max_labels"

    def outputs(self, items, scores, fused):
        winner, votes = vote(scores, self.slices, self.voting["mode"], fused)
        return [output(LABEL, bytes_array([items[winner]])), output(VOTES, votes), output(SCORES, fused)]
