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


def test_the_models_behind_embed_allow_room_for_a_prompt():
    assert decode_texts("TEXT", [b"x" * 71], 64, prompt_bytes=7) == ["x" * 71]
    message = r"TEXT\[0\]: text is 72 bytes, over the limit of 71 \(limits.max_text_bytes \+ 7 for a prompt\)"
    with pytest.raises(InvalidInput, match=message):
        decode_texts("TEXT", [b"x" * 72], 64, prompt_bytes=7)


def test_prompts_go_before_texts_only_where_set():
    from ecomserve.prompts import PASSAGE_PROMPT, QUERY_PROMPT, prompt_bytes, with_prompt

    prompts = {QUERY_PROMPT: "query: ", PASSAGE_PROMPT: "pässage: "}
    assert with_prompt(prompts, QUERY_PROMPT, ["red shoes"]) == ["query: red shoes"]
    assert with_prompt(prompts, PASSAGE_PROMPT, ("a", "b")) == ["pässage: a", "pässage: b"]
    assert with_prompt({}, QUERY_PROMPT, ["red shoes"]) == ["red shoes"]
    assert with_prompt(prompts, None, ["red shoes"]) == ["red shoes"]  # classify: no prompt
    assert prompt_bytes(prompts) == len("pässage: ".encode()) == 10 and prompt_bytes({}) == 0
