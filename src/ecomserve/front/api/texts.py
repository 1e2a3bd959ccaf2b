"""What the API does to texts before they reach a model: the input rules, prompts, token counts and
truncation, and Matryoshka-style dimensions on the way back.

Token counts come from each encoder's own tokenizer (the live release's tokenizer.json), so `usage`
is real and `truncate: false` can name the count and the limit. The models truncate at their end
anyway; the API cuts a text's start itself for `truncation_direction: left`."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from ecomserve.errors import InvalidInput
from ecomserve.front.api.errors import ApiError, Reason
from ecomserve.prompts import with_prompt
from ecomserve.spec import PipelineSpec
from ecomserve.validation import decode_texts


@dataclass(frozen=True)
class EncoderTokens:
    """One encoder's tokenizer, untruncated (to count), and its limit."""

    tokenizer: Tokenizer
    max_seq_len: int
    specials: int  # tokens the tokenizer adds to a text: [CLS] and [SEP], or the model's own

    @classmethod
    def load(cls, tokenizer_file: Path, max_seq_len: int) -> EncoderTokens:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return cls(tokenizer, max_seq_len, tokenizer.num_special_tokens_to_add(False))

    @property
    def budget(self) -> int:
        """Tokens a text may have once the special tokens are added."""
        return self.max_seq_len - self.specials


@dataclass(frozen=True)
class Prepared:
    texts: list[str]  # as the model gets them: prompt + text, cut at the start when asked
    tokens: int  # how many tokens the model reads of them (by the first encoder's tokenizer)


@dataclass(frozen=True)
class TextRules:
    encoders: list[EncoderTokens]
    prompts: dict[str, str]
    max_text_bytes: int
    max_inputs: int

    @classmethod
    def for_pipeline(cls, spec: PipelineSpec, tokenizer_files: list[Path]) -> TextRules:
        encoders = [EncoderTokens.load(f, e.max_seq_len) for f, e in zip(tokenizer_files, spec.encoders, strict=True)]
        return cls(encoders, dict(spec.prompts), spec.limits.max_text_bytes, spec.limits.max_candidates)

    @property
    def max_seq_len(self) -> int:
        return min(encoder.max_seq_len for encoder in self.encoders)

    def prompt_kind(self, name: str | None, param: str) -> str | None:
        """A prompt's name as the request gives it; an unknown one is refused (TEI's `prompt_name` rule)."""
        if name is not None and name not in self.prompts:
            known = ", ".join(sorted(self.prompts)) or "none: the spec sets no encoders[].prompts"
            raise ApiError(Reason.INVALID, f"{param}: unknown prompt {name!r}; this model's prompts: {known}", param)
        return name

    def prepare(
        self, texts: list[str], param: str, kind: str | None = None, truncate: bool = True, left: bool = False
    ) -> Prepared:
        """Texts checked by the models' rules, prompted, and fitted to the token limit (or refused when
        `truncate` is off: 400/413 naming the count and the limit)."""
        self.check_count(len(texts), param)
        try:
            decode_texts(param, texts, self.max_text_bytes)
        except InvalidInput as exc:
            reason = Reason.EMPTY if "empty" in str(exc) else Reason.INVALID
            raise ApiError(reason, str(exc), param) from None
        prompted = with_prompt(self.prompts, kind, texts)
        counted: list[int] = []
        for encoder in self.encoders:
            lengths = [len(e.ids) for e in encoder.tokenizer.encode_batch(prompted, add_special_tokens=False)]
            over = [i for i, length in enumerate(lengths) if length > encoder.budget]
            if over and not truncate:
                index = over[0]
                raise ApiError(
                    Reason.TOO_LONG,
                    f"{param}[{index}] is {lengths[index] + encoder.specials} tokens, over the model's limit of "
                    f"{encoder.max_seq_len} (encoders[].max_seq_len); shorten it or allow truncation",
                    param,
                )
            if over and left:
                prompt = self.prompts.get(kind, "") if kind else ""
                for index in over:
                    prompted[index] = self._cut_start(encoder, prompted[index], prompt)
            counted = counted or [min(length, encoder.budget) + encoder.specials for length in lengths]
        # What the first encoder reads of them: the model cuts the rest.
        return Prepared(prompted, sum(counted))

    def check_count(self, count: int, param: str) -> None:
        if count == 0:
            raise ApiError(Reason.INVALID, f"{param}: needs at least one text", param)
        if count > self.max_inputs:
            raise ApiError(
                Reason.TOO_MANY,
                f"{param}: {count} texts, over the limit of {self.max_inputs} (limits.max_candidates)",
                param,
            )

    @staticmethod
    def _cut_start(encoder: EncoderTokens, text: str, prompt: str) -> str:
        """`text` (prompt + body) without the start of its body, so that the prompt and the body's last
        tokens fit the budget."""
        encoding: Encoding = encoder.tokenizer.encode(text, add_special_tokens=False)
        prompt_tokens = len(encoder.tokenizer.encode(prompt, add_special_tokens=False).ids) if prompt else 0
        first_kept = len(encoding.ids) - (encoder.budget - prompt_tokens)
        return prompt + text[max(encoding.offsets[first_kept][0], len(prompt)) :]

    def tokenize(self, texts: list[str], kind: str | None, special: bool) -> list[list[dict]]:
        """TEI's `/tokenize`: every token with its id, text, whether it is special, and its character span."""
        self.check_count(len(texts), "inputs")
        prompted = with_prompt(self.prompts, kind, texts)
        tokenizer = self.encoders[0].tokenizer
        answer = []
        for text, encoding in zip(prompted, tokenizer.encode_batch(prompted, add_special_tokens=special), strict=True):
            answer.append([
                {
                    "id": token_id,
                    "text": token if is_special else text[start:stop],
                    "special": bool(is_special),
                    "start": None if is_special else start,
                    "stop": None if is_special else stop,
                }
                for token_id, token, is_special, (start, stop) in zip(
                    encoding.ids, encoding.tokens, encoding.special_tokens_mask, encoding.offsets, strict=True
                )
            ])  # fmt: skip
        return answer


def shorten(embeddings: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The first `dimensions` components, renormalised (Matryoshka-style); the caller checked the width."""
    if dimensions is None or dimensions >= embeddings.shape[1]:
        return embeddings
    cut = embeddings[:, :dimensions]
    return cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)


def as_base64(vector: np.ndarray) -> str:
    """OpenAI's base64 encoding: the float32 little-endian bytes."""
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
