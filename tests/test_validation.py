import numpy as np
import pytest

from ecomserve.errors import InvalidInput
from ecomserve.validation import check_count, decode_texts


def test_decodes_valid_utf8():
    values = np.array([b"red shoes", "café ☕".encode()], dtype=object)
    assert decode_texts("TEXT", values, 64) == ["red shoes", "café ☕"]


@pytest.mark.parametrize(
    "value, message",
    [
        (b"", r"TEXT\[1\]: text is empty or whitespace only"),
        (b" \t\n", r"TEXT\[1\]: text is empty or whitespace only"),
        (b"\xff\xfe", r"TEXT\[1\]: not valid UTF-8"),
        (b"x" * 65, r"TEXT\[1\]: text is 65 bytes, over the limit of 64 \(limits.max_text_bytes\)"),
    ],
)
def test_rejects_bad_text(value, message):
    with pytest.raises(InvalidInput, match=message):
        decode_texts("TEXT", [b"fine", value], 64)


def test_counts():
    check_count("CANDIDATES", 3, 3, "max_candidates")
    for count in (0, 4):
        with pytest.raises(
            InvalidInput, match=r"CANDIDATES: got \d elements, expected 1 to 3 \(limits.max_candidates\)"
        ):
            check_count("CANDIDATES", count, 3, "max_candidates")
