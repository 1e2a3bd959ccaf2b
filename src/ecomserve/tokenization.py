"""Text → token ids with the model's own fast tokenizer; shared by export and the tokenizer model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class TokenBatch:
    input_ids: np.ndarray  # int64 [batch, seq], padded to the longest text of the batch (or a multiple)
    attention_mask: np.ndarray  # int64 [batch, seq]
    truncated: int  # how many texts were cut at max_seq_len


class TextTokenizer:
    def __init__(self, tokenizer_file: str | Path, max_seq_len: int, pad_to_multiple: int = 1):
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        # Shipped tokenizer.json files often pad to a fixed length; pad to the batch's longest instead.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_seq_len)
        self.max_seq_len = max_seq_len
        # Triton batches requests of one shape only for GPU backends; rounding lengths up lets more meet.
        self.pad_to_multiple = pad_to_multiple

    def encode(self, texts: list[str]) -> TokenBatch:
        encodings = self._tokenizer.encode_batch(texts)
        truncated = sum(bool(encoding.overflowing) for encoding in encodings)
        rows = [encoding.ids for encoding in encodings]
        longest = max(len(row) for row in rows)
        # Truncation keeps `longest` within max_seq_len, so the cap never cuts a text.
        length = min(-(-longest // self.pad_to_multiple) * self.pad_to_multiple, self.max_seq_len)
        # Padded positions are masked out, so the id placed there never changes an answer.
        input_ids = np.zeros((len(rows), length), dtype=np.int64)
        attention_mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        return TokenBatch(input_ids, attention_mask, truncated)
