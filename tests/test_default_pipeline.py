"""The default pipeline (export/default.yaml: bundled MiniLM) served by a real tritonserver, against
sentence-transformers. Bars follow the spec's precision: fp32 must reproduce the reference; INT8 must
stay within its parity bar and within 0.01 NDCG@5 (the strict fp32 checks also run on the fp32
ensemble pipeline in test_fusion_and_voting.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from support import client_for, cosine_rows

from ecomserve.evaluation import load_eval_set, mean_ndcg
from ecomserve.export.parity import MIN_COSINE
from ecomserve.paths import EXPORT_DIR
from ecomserve.spec import load_spec, resolve_source

pytestmark = pytest.mark.integration

PRECISION = load_spec(EXPORT_DIR / "default.yaml").encoders[0].precision
EXACT = PRECISION == "fp32"
NDCG_TOLERANCE = 0.005 if EXACT else 0.01
SCORE_TOLERANCE = 1e-4 if EXACT else 0.08  # cosine error of INT8 on a single score


@pytest.fixture(scope="module")
def eval_set():
    return load_eval_set()


@pytest.fixture(scope="module")
def sentence_transformer():
    """The reference users compare against: sentence-transformers on the same bundled weights."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(resolve_source("bundled:all-MiniLM-L6-v2")), device="cpu")


@pytest.fixture(scope="module")
def st_embed(sentence_transformer):
    cache: dict[str, np.ndarray] = {}

    def embed(texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            cache.update(zip(missing, sentence_transformer.encode(missing, normalize_embeddings=True)))
        return np.stack([cache[t] for t in texts])

    return embed


def test_embed_matches_sentence_transformers(default_server, protocol, eval_set, st_embed):
    texts = eval_set.titles + [q.text for q in eval_set.queries]
    with client_for(default_server, protocol) as client:
        served = client.embed(texts)
    assert served.shape == (len(texts), 384)
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    assert cosine_rows(served, st_embed(texts)).min() >= MIN_COSINE[PRECISION]


def test_rank_orders_like_the_reference_and_keeps_ndcg(default_server, protocol, eval_set, st_embed):
    titles = eval_set.titles
    with client_for(default_server, protocol) as client:
        for query in eval_set.queries:
            result = client.rank(query.text, titles)
            reference = st_embed(titles) @ st_embed([query.text])[0]
            assert result.scores.shape == (len(titles),) and result.encoder_scores.shape == (1, len(titles))
            assert np.abs(result.scores - reference).max() < SCORE_TOLERANCE
            if EXACT:
                assert result.order() == list(np.argsort(-reference, kind="stable")), query.text
        served_ndcg = mean_ndcg(eval_set, lambda q, items: client.rank(q, items).scores)
    reference_ndcg = mean_ndcg(eval_set, lambda q, items: st_embed(items) @ st_embed([q])[0])
    assert abs(served_ndcg - reference_ndcg) <= NDCG_TOLERANCE
    assert reference_ndcg > 0.6  # the eval set is learnable: a sanity floor, not a target


def test_classify_picks_the_most_similar_label(default_server, protocol, eval_set, st_embed):
    labels = eval_set.category_names
    with client_for(default_server, protocol) as client:
        for title in eval_set.titles[:20]:
            result = client.classify(title, labels)
            reference = st_embed(labels) @ st_embed([title])[0]
            best = int(np.argmax(result.scores))  # one encoder: its vote is its best label
            assert result.label == labels[best]
            assert result.votes.tolist() == [int(i == best) for i in range(len(labels))]
            assert np.abs(result.scores - reference).max() < SCORE_TOLERANCE
            if EXACT or np.sort(reference)[-1] - np.sort(reference)[-2] > 2 * SCORE_TOLERANCE:
                assert best == int(np.argmax(reference)), title


def test_same_input_same_answer(default_server):
    """Alone, inside a 32-text request, and under dynamic batching with 16 concurrent clients."""
    probe = "stainless steel insulated water bottle"
    others = [f"assorted catalog item number {i} with a longer title than the probe" for i in range(31)]
    with client_for(default_server, "grpc") as client:
        alone = client.embed([probe])[0]
        in_batch = client.embed(others[:16] + [probe] + others[16:])[16]
        with ThreadPoolExecutor(16) as pool:
            concurrent = list(pool.map(lambda i: client.embed([probe] if i % 2 else [others[i % 31]])[0], range(64)))
    assert np.abs(in_batch - alone).max() <= 1e-5
    for i, vector in enumerate(concurrent):
        if i % 2:
            assert np.abs(vector - alone).max() <= 1e-5


def _truncations(server) -> float:
    import re
    import urllib.request

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    values = re.findall(r"^ecomserve_truncated_texts_total\{[^}]*\} (\S+)$", text, re.MULTILINE)
    return sum(float(v) for v in values)


def test_truncation_is_counted_in_metrics(default_server):
    long_title = " ".join(f"w{i}" for i in range(200))  # far over max_seq_len=128 tokens, under 2048 bytes
    before = _truncations(default_server)
    with client_for(default_server, "http") as client:
        client.embed([long_title, "short title", long_title + " variant"])
    assert _truncations(default_server) == before + 2
