"""The HTTP API against the real server, through clients no one here wrote: the official openai SDK,
LangChain's OpenAIEmbeddings, the cohere SDK (v1 and v2 clients) and huggingface_hub's
InferenceClient (TEI). Embeddings must equal `embed`'s, rerank orders `rank`'s; every error rule is
sent over raw HTTP in each API's own shape, and a correct request answers correctly after it."""

from __future__ import annotations

import base64
import threading
import time
import uuid

import cohere
import huggingface_hub
import numpy as np
import openai
import pytest
import requests
from huggingface_hub import InferenceClient
from langchain_openai import OpenAIEmbeddings
from support import client_for, metric_total, wait_for

from ecomserve.front.api.context import model_id
from ecomserve.repository.builder import built_spec

pytestmark = pytest.mark.integration
WIDTH = 384


def unique(text: str) -> str:
    """A text never sent before: `embed`'s response cache must not answer it."""
    return f"{text} {uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def api(default_server) -> str:
    return default_server.api_url


@pytest.fixture(scope="module")
def served_model(default_server) -> str:
    return model_id(built_spec(default_server.options.repository))


def embed_reference(server, texts: list[str]) -> np.ndarray:
    return client_for(server, "grpc").embed(texts)


def assert_same(found, expected) -> None:
    """The same embedding as `embed`'s: within float noise (a dynamic batch sums in another order)."""
    np.testing.assert_allclose(np.asarray(found, dtype=np.float32), expected, rtol=0, atol=1e-6)


def assert_answers(server, api: str) -> None:
    """The server still answers a correct request with `embed`'s vector."""
    text = unique("trail running shoes")
    answer = requests.post(f"{api}/embed", json={"inputs": text}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert_same(np.array(answer.json(), dtype=np.float32), embed_reference(server, [text]))


def test_openai_sdk_embeddings_equal_embed_in_base64_and_float(default_server, api, served_model):
    client = openai.OpenAI(base_url=f"{api}/v1", api_key="not-needed", max_retries=0)
    texts = [unique("wireless noise cancelling headphones"), unique("stainless steel water bottle")]
    expected = embed_reference(default_server, texts)
    # The SDK asks for base64 unless told otherwise, and decodes it.
    by_default = client.embeddings.create(model=served_model, input=texts)
    assert [item.index for item in by_default.data] == [0, 1]
    assert_same(np.array([item.embedding for item in by_default.data], dtype=np.float32), expected)
    as_float = client.embeddings.create(model=served_model, input=texts[0], encoding_format="float")
    assert_same(np.array(as_float.data[0].embedding, dtype=np.float32), expected[0])
    tokens = sum(len(t) for t in requests.post(f"{api}/tokenize", json={"inputs": texts}, timeout=10).json())
    assert by_default.usage.prompt_tokens == by_default.usage.total_tokens == tokens
    assert by_default.model == served_model and client.models.list().data[0].id == served_model


def test_openai_sdk_errors_are_its_exceptions(api, served_model):
    client = openai.OpenAI(base_url=f"{api}/v1", api_key="not-needed", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.embeddings.create(model=served_model, input=["fine text", "   "])
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.embeddings.create(model="text-embedding-3-small", input="a query")
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=served_model, input="a query", dimensions=WIDTH + 1)


def test_openai_dimensions_are_truncated_and_renormalised(default_server, api, served_model):
    client = openai.OpenAI(base_url=f"{api}/v1", api_key="not-needed", max_retries=0)
    text = unique("ergonomic office chair")
    full = embed_reference(default_server, [text])[0]
    short = np.array(client.embeddings.create(model=served_model, input=text, dimensions=64).data[0].embedding)
    assert short.shape == (64,)
    np.testing.assert_allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)


def test_langchain_openai_embeddings(default_server, api, served_model):
    # check_embedding_ctx_length=False: LangChain otherwise sends tiktoken ids, which are not this model's.
    embeddings = OpenAIEmbeddings(
        model=served_model, base_url=f"{api}/v1", api_key="not-needed", check_embedding_ctx_length=False
    )
    texts = [unique("cast iron skillet"), unique("usb-c charging cable")]
    documents = np.array(embeddings.embed_documents(texts), dtype=np.float32)
    assert_same(documents, embed_reference(default_server, texts))
    query = unique("skillet")
    assert_same(np.array(embeddings.embed_query(query), dtype=np.float32), embed_reference(default_server, [query])[0])


def rerank_case() -> tuple[str, list[str]]:
    query = unique("running shoes for marathon training")
    documents = [
        unique("cast iron skillet 12 inch"),
        unique("lightweight marathon running shoe with foam cushioning"),
        unique("trail running shoes waterproof"),
        unique("bluetooth speaker"),
    ]
    return query, documents


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cohere_sdk_rerank_orders_as_rank_does(default_server, api, served_model, version):
    query, documents = rerank_case()
    expected = client_for(default_server, "grpc").rank(query, documents)
    if version == "v1":
        client = cohere.Client(base_url=api, api_key="not-needed")
        answer = client.rerank(model=served_model, query=query, documents=documents, top_n=3, return_documents=True)
        assert [r.document.text for r in answer.results] == [documents[i] for i in expected.order()[:3]]
    else:
        client = cohere.ClientV2(base_url=api, api_key="not-needed")
        answer = client.rerank(model=served_model, query=query, documents=documents, top_n=3)
    assert [r.index for r in answer.results] == expected.order()[:3]
    scores = [r.relevance_score for r in answer.results]
    np.testing.assert_allclose(scores, (expected.scores[expected.order()[:3]] + 1) / 2, atol=1e-6)
    assert all(0 <= s <= 1 for s in scores)


def test_huggingface_inference_client_against_tei_embed(default_server, api, monkeypatch):
    # The session is offline for model hubs (conftest); this client talks to the loopback server only.
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    client = InferenceClient(model=f"{api}/embed")
    text = unique("memory foam pillow")
    vector = client.feature_extraction(text, truncate=True, truncation_direction="right")
    assert_same(np.asarray(vector).reshape(-1), embed_reference(default_server, [text])[0])


def test_tei_rerank_tokenize_info_health(default_server, api, served_model):
    query, documents = rerank_case()
    expected = client_for(default_server, "grpc").rank(query, documents)
    raw = requests.post(
        f"{api}/rerank", json={"query": query, "texts": documents, "raw_scores": True, "return_text": True}, timeout=30
    ).json()
    assert [r["index"] for r in raw] == expected.order()
    np.testing.assert_allclose([r["score"] for r in raw], expected.scores[expected.order()], atol=1e-6)
    assert [r["text"] for r in raw] == [documents[i] for i in expected.order()]
    tokens = requests.post(f"{api}/tokenize", json={"inputs": "WH-1000XM4 headphones"}, timeout=10).json()[0]
    assert tokens[0]["special"] and tokens[0]["text"] == "[CLS]" and tokens[-1]["text"] == "[SEP]"
    assert "".join(t["text"] for t in tokens[1:-1]).lower().startswith("wh-1000")
    info = requests.get(f"{api}/info", timeout=10).json()
    assert info["model_id"] == served_model and info["max_input_length"] == 128
    assert requests.get(f"{api}/health", timeout=10).status_code == 200


def test_classify_answers_as_the_model_does(default_server, api, served_model):
    text, labels = unique("waterproof hiking boots"), ["footwear", "kitchen", "electronics"]
    expected = client_for(default_server, "grpc").classify(text, labels)
    answer = requests.post(
        f"{api}/v1/classify", json={"text": text, "labels": labels, "model": served_model}, timeout=30
    ).json()
    assert answer["label"] == expected.label
    assert [s["label"] for s in answer["scores"]] == labels
    assert [s["votes"] for s in answer["scores"]] == expected.votes.tolist()
    np.testing.assert_allclose([s["score"] for s in answer["scores"]], expected.scores, atol=1e-6)


def test_truncation_left_right_and_off(default_server, api):
    words = " ".join(f"w{i}" for i in range(300))
    long_text = unique("start") + " " + words + " final words"
    right = requests.post(f"{api}/embed", json={"inputs": long_text}, timeout=30)
    expected = embed_reference(default_server, [long_text])[0]
    assert_same(np.array(right.json()[0], np.float32), expected)
    left = np.array(
        requests.post(f"{api}/embed", json={"inputs": long_text, "truncation_direction": "Left"}, timeout=30).json()[0]
    )
    assert float(left @ np.array(right.json()[0])) < 0.999  # a different end of the text was read
    refused = requests.post(f"{api}/embed", json={"inputs": long_text, "truncate": False}, timeout=30)
    assert refused.status_code == 413 and refused.json()["error_type"] == "Validation"
    assert "tokens, over the model's limit of 128" in refused.json()["error"]
    openai_refused = requests.post(
        f"{api}/v1/embeddings", json={"input": long_text, "model": "x/all-MiniLM-L6-v2", "truncate": "NONE"}, timeout=30
    )
    assert openai_refused.status_code == 400
    assert openai_refused.json()["error"]["code"] == "context_length_exceeded"


OPENAI, TEI = "/v1/embeddings", "/embed"
BAD_REQUESTS = [
    # (endpoint, body, status, words the message must hold)
    (OPENAI, b'{"input": "a", "model": ', 400, "not valid JSON"),
    (TEI, b'{"inputs": "a"', 422, "not valid JSON"),
    (OPENAI, b'{"input": "\xff\xfe", "model": "all-MiniLM-L6-v2"}', 400, "not valid JSON"),
    (OPENAI, b'{"input": "\\ud800", "model": "all-MiniLM-L6-v2"}', 400, "not valid JSON"),
    (OPENAI, b'{"input": "", "model": "all-MiniLM-L6-v2"}', 400, "empty"),
    (TEI, b'{"inputs": ["ok", "\\u200b"]}', 400, "empty"),
    (OPENAI, b'{"input": [], "model": "all-MiniLM-L6-v2"}', 400, "at least one"),
    (OPENAI, b'{"input": [[1, 2, 3]], "model": "all-MiniLM-L6-v2"}', 400, "token arrays"),
    (OPENAI, b'{"input": "a", "model": "all-MiniLM-L6-v2", "colour": 1}', 400, "unrecognized"),
    (OPENAI, b'{"input": "a", "model": "all-MiniLM-L6-v2", "encoding_format": "int8"}', 400, "encoding_format"),
    (OPENAI, b'{"input": "a", "model": "gpt-4"}', 404, "not found"),
    (TEI, b'{"inputs": "a", "normalize": false}', 422, "normalise"),
    (TEI, b'{"inputs": "a", "prompt_name": "query"}', 422, "unknown prompt"),
    (TEI, b'{"inputs": "' + b"x" * 3000 + b'"}', 422, "max_text_bytes"),
    ("/v1/rerank", b'{"query": "a", "documents": []}', 400, "at least one"),
    ("/rerank", b'{"query": "", "texts": ["a"]}', 400, "empty"),
    ("/v1/classify", b'{"text": "a", "labels": "not a list"}', 400, "labels"),
]


@pytest.mark.parametrize(("path", "body", "status", "words"), BAD_REQUESTS)
def test_bad_requests_get_the_apis_error_shape_and_the_server_answers_after(default_server, api, path, body, status,
                                                                             words):  # fmt: skip
    answer = requests.post(f"{api}{path}", data=body, headers={"content-type": "application/json"}, timeout=30)
    assert answer.status_code == status, answer.text
    error = answer.json()
    if path == TEI or path == "/rerank":
        assert set(error) == {"error", "error_type"} and words in error["error"]
    elif path in ("/v1/rerank",):
        assert words in error["message"]
    else:
        assert set(error["error"]) == {"message", "type", "param", "code"} and words in error["error"]["message"]
    assert_answers(default_server, api)


def test_too_many_inputs_and_oversized_bodies(default_server, api):
    many = [f"item {i}" for i in range(1001)]
    answer = requests.post(f"{api}/embed", json={"inputs": many}, timeout=30)
    assert answer.status_code == 413 and "limits.max_candidates" in answer.json()["error"]
    huge = b'{"input": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    answer = requests.post(f"{api}/v1/embeddings", data=huge, timeout=30)
    assert answer.status_code == 413 and "max_body_bytes" in answer.json()["error"]["message"]
    assert requests.get(f"{api}/v1/nothing", timeout=10).status_code == 404
    assert requests.get(f"{api}/v1/embeddings", timeout=10).status_code == 405
    assert_answers(default_server, api)


def test_overload_is_429_with_retry_after(default_server, api):
    """A request over the front's texts-in-flight budget while another holds it waits in line for at most
    `max_wait_s`, then is refused."""
    front = built_spec(default_server.options.repository).serving.front
    # 1,000 long titles take seconds on 2 cores: the holder outlasts the line's wait.
    big = [unique("bulk stainless steel insulated water bottle title " * 8) for _ in range(1000)]
    holder = threading.Thread(target=requests.post, args=(f"{api}/embed",), kwargs={"json": {"inputs": big}})
    holder.start()
    try:
        assert wait_for(lambda: metric_total(default_server, "ecomserve_front_texts_in_flight") > 0, timeout_s=20)
        answer = requests.post(f"{api}/v1/embeddings", json={"input": [unique("q")], "model": "x"}, timeout=30)
        start = time.perf_counter()
        refused = requests.post(f"{api}/embed", json={"inputs": [unique("q")] * 2}, timeout=30)
        waited = time.perf_counter() - start
        still_holding = holder.is_alive()
    finally:
        holder.join()
    # The first asked for an unknown model: that is checked before admission.
    assert answer.status_code == 404
    assert still_holding, "the holder finished within the line's wait: make it longer"
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error_type"] == "Overloaded" and f"after waiting {front.max_wait_s:g} s" in refused.text
    assert front.max_wait_s * 0.9 <= waited < front.max_wait_s + 5
    assert_answers(default_server, api)


def test_api_requests_are_counted_on_the_metrics_port(default_server, api):
    before = metric_total(default_server, "ecomserve_api_requests_total", endpoint="/health", code="200")
    requests.get(f"{api}/health", timeout=10)
    assert metric_total(default_server, "ecomserve_api_requests_total", endpoint="/health", code="200") == before + 1


def test_base64_is_float32_little_endian(default_server, api, served_model):
    text = unique("garden hose 50 ft")
    body = {"input": text, "model": served_model, "encoding_format": "base64"}
    encoded = requests.post(f"{api}/v1/embeddings", json=body, timeout=30).json()["data"][0]["embedding"]
    vector = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert_same(vector, embed_reference(default_server, [text])[0])
