"""The HTTP API's rules without a server: request schemas, error shapes, keys, token limits,
truncation and dimensions (tests/test_api.py sends them all to the real server)."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from ecomserve.front.api.errors import ApiError, Dialect, Reason
from ecomserve.front.api.schemas import EmbeddingsRequest, RerankRequest, TeiEmbedRequest, parse
from ecomserve.front.api.texts import EncoderTokens, TextRules, as_base64, shorten
from ecomserve.front.policy import Access, Keys, bearer_token
from ecomserve.spec import resolve_source
from ecomserve.tokenization import TOKENIZER_FILE


@pytest.fixture(scope="module")
def rules() -> TextRules:
    tokens = EncoderTokens.load(resolve_source("bundled:all-MiniLM-L6-v2") / TOKENIZER_FILE, 16)
    return TextRules([tokens], {"query": "query: "}, max_text_bytes=128, max_inputs=3)


def test_schemas_name_the_field():
    with pytest.raises(ApiError, match="unrecognized request argument") as extra:
        parse(EmbeddingsRequest, b'{"input": "a", "model": "m", "extra": 1}')
    assert extra.value.param == "extra"
    with pytest.raises(ApiError, match="token arrays"):
        parse(EmbeddingsRequest, b'{"input": [[101, 102]], "model": "m"}')
    with pytest.raises(ApiError, match="not valid JSON"):
        parse(EmbeddingsRequest, b'{"input": "\\udc00", "model": "m"}')
    with pytest.raises(ApiError, match="must be a JSON object"):
        parse(EmbeddingsRequest, b"[1]")
    # Cohere's and TEI's SDKs send fields this server does not use: ignored, as their servers do.
    rerank = parse(RerankRequest, b'{"query": "q", "documents": ["a", {"text": "b"}], "max_chunks_per_doc": 3}')
    assert rerank.documents[1].text == "b"
    assert parse(TeiEmbedRequest, b'{"inputs": "a", "truncation_direction": "Left"}').truncation_direction == "left"


@pytest.mark.parametrize(
    ("dialect", "status", "body"),
    [
        (Dialect.OPENAI, 400, {"error": {"message": "m", "type": "invalid_request_error", "param": "input",
                                         "code": "context_length_exceeded"}}),
        (Dialect.TEI, 413, {"error": "m", "error_type": "Validation"}),
        (Dialect.COHERE, 400, {"message": "m"}),
    ],
)  # fmt: skip
def test_each_dialect_has_its_own_error_shape(dialect, status, body):
    response = dialect.render(ApiError(Reason.TOO_LONG, "m", "input"))
    assert response.status_code == status and orjson.loads(response.body) == body


def test_overload_is_429_with_retry_after_in_every_dialect():
    for dialect in Dialect:
        response = dialect.render(ApiError(Reason.OVERLOADED, "busy"))
        assert response.status_code == 429 and response.headers["retry-after"] == "1"


def test_keys():
    assert bearer_token("Bearer abc") == bearer_token("bearer  abc") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token(None) is None
    open_server = Keys(admin="admin")
    assert open_server.admits(Access.INFER, None, None)
    keyed = Keys(admin="admin", api="secret")
    assert keyed.admits(Access.HEALTH, None, None)
    assert not keyed.admits(Access.OPEN, "Bearer wrong", None)
    assert keyed.admits(Access.INFER, "Bearer secret", None)
    assert keyed.admits(Access.OPEN, None, "admin")  # the admin key is the stronger one
    assert not keyed.admits(Access.OPEN, None, "wrong")


def test_prepare_applies_the_rules_and_counts_tokens(rules):
    prepared = rules.prepare(["red shoes"], "input", kind="query")
    assert prepared.texts == ["query: red shoes"]
    assert prepared.tokens == len(rules.encoders[0].tokenizer.encode("query: red shoes").ids)
    with pytest.raises(ApiError, match="empty") as empty:
        rules.prepare(["ok", " \u200b "], "input")
    assert empty.value.reason is Reason.EMPTY and "input[1]" in str(empty.value)
    with pytest.raises(ApiError, match="limits.max_text_bytes"):
        rules.prepare(["x" * 129], "input")
    with pytest.raises(ApiError, match="over the limit of 3") as many:
        rules.prepare(["a"] * 4, "input")
    assert many.value.reason is Reason.TOO_MANY
    with pytest.raises(ApiError, match="unknown prompt 'passage'"):
        rules.prompt_kind("passage", "prompt_name")


def test_truncation_off_names_the_count_and_the_limit_and_left_keeps_the_end(rules):
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen end"
    with pytest.raises(ApiError, match=r"input\[0\] is 18 tokens, over the model's limit of 16") as refused:
        rules.prepare([text], "input", truncate=False)
    assert refused.value.reason is Reason.TOO_LONG
    assert rules.prepare([text], "input").texts == [text]  # the model cuts the end itself
    (left,) = rules.prepare([text], "input", kind="query", left=True).texts
    assert left.startswith("query: ") and left.endswith("fifteen end") and "one two" not in left
    assert len(rules.encoders[0].tokenizer.encode(left).ids) == 16


def test_dimensions_and_base64():
    vectors = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    short = shorten(vectors, 3)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(short[0] * np.linalg.norm(vectors[0, :3]), vectors[0, :3], atol=1e-6)
    assert shorten(vectors, None) is vectors
    decoded = np.frombuffer(base64.b64decode(as_base64(vectors[1])), dtype="<f4")
    np.testing.assert_array_equal(decoded, vectors[1])
