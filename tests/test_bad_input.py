"""DESIGN.md's bad-input rules, sent to the real server over raw HTTP and gRPC.

After every bad request a correct one must still get the correct answer, and at the end the
server is still ready with the same python-backend processes (no stub crashed or restarted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from raw_protocol import Tensor, infer

pytestmark = pytest.mark.integration

MAX_TEXT_BYTES, MAX_CANDIDATES, MAX_LABELS = 2048, 1000, 256  # export/default.yaml


def text(*values: bytes, batched: bool = True) -> Tensor:
    return Tensor("TEXT", "BYTES", [len(values), 1] if batched else [len(values)], list(values))


def rank_inputs(query: list[bytes], candidates: list[bytes]) -> list[Tensor]:
    return [Tensor("QUERY", "BYTES", [len(query)], query), Tensor("CANDIDATES", "BYTES", [len(candidates)], candidates)]


def classify_inputs(value: bytes, labels: list[bytes]) -> list[Tensor]:
    return [Tensor("TEXT", "BYTES", [1], [value]), Tensor("LABELS", "BYTES", [len(labels)], labels)]


INVALID = ("400", "INVALID_ARGUMENT")
NOT_FOUND = ("404", "NOT_FOUND")

# id → (model, inputs, version, expected statuses, words the message must contain)
CASES = {
    "empty text": ("embed", [text(b"")], "", INVALID, ["TEXT[0]", "empty"]),
    "whitespace text": ("embed", [text(b"ok", b" \t\n ")], "", INVALID, ["TEXT[1]", "whitespace"]),
    "invalid utf-8": ("embed", [text(b"caf\xe9")], "", INVALID, ["TEXT[0]", "UTF-8"]),
    "text over limit": ("embed", [text(b"x" * (MAX_TEXT_BYTES + 1))], "", INVALID, ["TEXT[0]", "2049 bytes", "2048"]),
    "invisible text": ("embed", [text(b"ok", "\x00\u200b\ufeff\u2060".encode())], "", INVALID, ["TEXT[1]", "empty"]),
    "only NUL": ("embed", [text(b"\x00\x00")], "", INVALID, ["TEXT[0]", "empty"]),
    "empty query": ("rank", rank_inputs([b""], [b"red shoes"]), "", INVALID, ["QUERY[0]", "empty"]),
    "empty candidate": ("rank", rank_inputs([b"shoes"], [b"red shoes", b""]), "", INVALID, ["CANDIDATES[1]", "empty"]),
    "invalid utf-8 candidate": (
        "rank",
        rank_inputs([b"shoes"], [b"\xff\xfe"]),
        "",
        INVALID,
        ["CANDIDATES[0]", "UTF-8"],
    ),
    "candidate over limit": (
        "rank",
        rank_inputs([b"shoes"], [b"y" * (MAX_TEXT_BYTES + 1)]),
        "",
        INVALID,
        ["CANDIDATES[0]", "2048"],
    ),
    "zero candidates": ("rank", rank_inputs([b"shoes"], []), "", INVALID, ["CANDIDATES", "got 0", "1000"]),
    "too many candidates": (
        "rank",
        rank_inputs([b"shoes"], [b"item"] * (MAX_CANDIDATES + 1)),
        "",
        INVALID,
        ["CANDIDATES", "1001", "1000"],
    ),
    "zero labels": ("classify", classify_inputs(b"espresso machine", []), "", INVALID, ["LABELS", "got 0", "256"]),
    "too many labels": (
        "classify",
        classify_inputs(b"espresso machine", [b"label"] * (MAX_LABELS + 1)),
        "",
        INVALID,
        ["LABELS", "257", "256"],
    ),
    "empty classify text": ("classify", classify_inputs(b"  ", [b"kitchen"]), "", INVALID, ["TEXT[0]", "empty"]),
    "wrong dtype": ("embed", [Tensor("TEXT", "INT32", [1, 1], [7])], "", INVALID, ["TEXT", "INT32", "BYTES"]),
    "wrong shape": ("embed", [Tensor("TEXT", "BYTES", [1, 2], [b"a", b"b"])], "", INVALID, ["TEXT", "[1,2]"]),
    "wrong rank shape": (
        "rank",
        [Tensor("QUERY", "BYTES", [2], [b"a", b"b"]), *rank_inputs([b"q"], [b"c"])[1:]],
        "",
        INVALID,
        ["QUERY", "Expected [1]"],
    ),
    "missing input": ("rank", rank_inputs([b"shoes"], [b"red shoes"])[:1], "", INVALID, ["CANDIDATES", "missing"]),
    "unknown model": ("recommend", [text(b"shoes")], "", NOT_FOUND, ["recommend", "not found"]),
    "unknown version": ("embed", [text(b"shoes")], "7", NOT_FOUND, ["embed", "version 7", "not found"]),
}


def stub_pids(server_pid: int) -> set[int]:
    """The python-backend stub processes tritonserver started (one per model instance)."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    return {int(pid) for pid in children}


@pytest.fixture(scope="module")
def known_good(default_server):
    """The correct answers every bad request is followed by."""
    embedding = infer("http", default_server, "embed", [text(b"red running shoes")]).outputs["EMBEDDING"]
    scores = infer("http", default_server, "rank", rank_inputs([b"running shoes"], [b"trail runner", b"teapot"]))
    return {"embedding": embedding, "scores": scores.outputs["SCORES"], "stubs": stub_pids(default_server.pid)}


@pytest.mark.parametrize("case", CASES.keys())
def test_bad_input_is_refused_and_server_keeps_answering(default_server, protocol, known_good, case):
    model, tensors, version, statuses, words = CASES[case]
    answer = infer(protocol, default_server, model, tensors, version)
    assert not answer.ok
    assert answer.status == statuses[0 if protocol == "http" else 1], answer.message
    for word in words:
        assert word in answer.message, f"{word!r} not in {answer.message!r}"

    again = infer(protocol, default_server, "embed", [text(b"red running shoes")])
    assert np.abs(again.outputs["EMBEDDING"] - known_good["embedding"]).max() <= 1e-5
    ranked = infer(protocol, default_server, "rank", rank_inputs([b"running shoes"], [b"trail runner", b"teapot"]))
    assert np.abs(ranked.outputs["SCORES"] - known_good["scores"]).max() <= 1e-5


def test_one_bad_text_fails_only_its_own_request_in_a_dynamic_batch(default_server):
    """Good and bad requests batched together: only the bad one fails."""
    from concurrent.futures import ThreadPoolExecutor

    requests = [[text(b"")] if i % 4 == 0 else [text(f"product {i}".encode())] for i in range(32)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda t: infer("grpc", default_server, "embed", t), requests))
    assert [a.ok for a in answers] == [i % 4 != 0 for i in range(32)]


def test_server_survives_all_bad_input(default_server, known_good):
    for model, tensors, version, _, _ in CASES.values():
        for protocol in ("http", "grpc"):
            assert not infer(protocol, default_server, model, tensors, version).ok
    assert default_server.is_ready()
    assert stub_pids(default_server.pid) == known_good["stubs"]


def test_limits_come_from_the_spec(trio_server, protocol):
    """The trio pipeline allows 8 candidates and 256-byte texts (tests/conftest.py)."""
    too_many = infer(protocol, trio_server, "rank", rank_inputs([b"shoes"], [b"item"] * 9))
    assert not too_many.ok and "expected 1 to 8" in too_many.message
    too_long = infer(protocol, trio_server, "embed", [text(b"z" * 257)])
    assert not too_long.ok and "257 bytes, over the limit of 256" in too_long.message
    assert infer(protocol, trio_server, "rank", rank_inputs([b"shoes"], [b"item"] * 8)).ok


def test_an_error_is_never_served_from_the_response_cache(default_server):
    """Triton 2.51 caches a python model's error as an empty success; `embed` must not (README)."""
    for _ in range(3):
        answer = infer("http", default_server, "embed", [text(b"   ")])
        assert not answer.ok and answer.status == "400", answer
