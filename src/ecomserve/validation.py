"""The bad-input rules of DESIGN.md, as plain functions the Triton models call.

Each raises InvalidInput with a message naming the tensor and the limit."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from ecomserve.errors import InvalidInput


def decode_texts(tensor: str, values: Iterable[object], max_text_bytes: int, prompt_bytes: int = 0) -> list[str]:
    """Decode a BYTES tensor's elements into text, enforcing UTF-8, non-blank and the byte limit. The models
    behind `embed` allow `prompt_bytes` more, the room a query or passage prompt takes (ecomserve.prompts)."""
    texts = []
    limit = max_text_bytes + prompt_bytes
    for index, value in enumerate(values):
        raw = value if isinstance(value, bytes) else str(value).encode()
        if len(raw) > limit:
            allowance = f" + {prompt_bytes} for a prompt" if prompt_bytes else ""
            raise InvalidInput(
                f"{tensor}[{index}]: text is {len(raw)} bytes, over the limit of {limit} "
                f"(limits.max_text_bytes{allowance})"
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{tensor}[{index}]: not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
        if not _has_visible_character(text):
            raise InvalidInput(f"{tensor}[{index}]: text is empty or whitespace only")
        texts.append(text)
    return texts


def _has_visible_character(text: str) -> bool:
    """False for text made only of whitespace, control (NUL …) and format characters (zero-width space and
    joiners, BOM): a tokenizer turns all of them into nothing, and the encoder would embed an empty text."""
    return any(not (char.isspace() or unicodedata.category(char)[0] in "CZ") for char in text)


def check_count(tensor: str, count: int, limit: int, limit_name: str) -> None:
    """A list input (CANDIDATES, LABELS) must hold between 1 and `limit` elements."""
    if not 1 <= count <= limit:
        raise InvalidInput(f"{tensor}: got {count} elements, expected 1 to {limit} (limits.{limit_name})")
