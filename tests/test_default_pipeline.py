"""The default pipeline (export/default.yaml: the bundled MiniLM's 3-layer distilled student, static INT8) served by
a real tritonserver, against the PyTorch model the build checks it against (the fp32 student), and against
sentence-transformers' full all-MiniLM-L6-v2 for issue 18's quality rule. INT8 does not reproduce the reference
exactly, so ranking and classification are held to bars measured on it (below); the exact fp32 checks run on the fp32
ensemble pipeline in test_fusion_and_voting.py."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from support import TorchReference, client_for, cosine_rows, embed_cache_counts, metric_total

from ecomserve.evaluation import classify_accuracy, load_eval_set, mean_ndcg
from ecomserve.export.parity import MIN_COSINE
from ecomserve.paths import EXPORT_DIR
from ecomserve.spec import load_spec, resolve_source

pytestmark = pytest.mark.integration

DEFAULT = load_spec(EXPORT_DIR / "default.yaml").encoders[0]
# Bars for the INT8 default (any more exact precision meets them too), measured against its fp32 reference on the
# eval set (20 queries x 60 titles; 60 titles x 8 labels), for the full model at INT8 and then the student: largest
# score error 0.042 / 0.032; 3.7% / 2.3% of title pairs ranked in the other order, none whose reference scores
# differ by more than 0.058 / 0.043; the label picked at most 0.011 / 0.007 below the reference's best label (3 / 2
# of 60 titles pick another label, none of the first 20). Each bar keeps about twice the larger value as margin.
SCORE_TOLERANCE = 0.08  # largest error of one served score
ORDER_GAP = 0.1  # titles whose reference scores differ by more than this are served in the same order
MAX_INVERTED = 0.08  # at most this share of title pairs (mean over the queries) is served the other way
LABEL_GAP = 0.03  # the label served is at most this far below the reference's best label
# Mean NDCG@5 may not fall further than this below the reference's. One-sided: on 20 queries INT8 moves it both
# ways (the full model 0.0018 below its fp32; the student 0.028 above its fp32 student, 0.8325 against 0.8045).
NDCG_TOLERANCE = 0.01
# Issue 18's rule for the default: within 0.01 NDCG@5 and 0.02 classify accuracy of the full fp32 model.
MAX_NDCG_LOSS, MAX_CLASSIFY_LOSS = 0.01, 0.02


@pytest.fixture(scope="module")
def eval_set():
    return load_eval_set()


def _cached(embed_uncached):
    """`embed_uncached` over texts, each text computed once per module."""
    cache: dict[str, np.ndarray] = {}

    def embed(texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            cache.update(zip(missing, embed_uncached(missing)))
        return np.stack([cache[t] for t in texts])

    return embed


@pytest.fixture(scope="module")
def reference_embed():
    """The PyTorch model the build verifies the default against: the fp32 distilled student."""
    return _cached(TorchReference(DEFAULT).embed)


@pytest.fixture(scope="module")
def teacher_embed():
    """The model users know: sentence-transformers on the full bundled all-MiniLM-L6-v2."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(resolve_source(DEFAULT.source)), device="cpu")
    return _cached(lambda texts: model.encode(texts, normalize_embeddings=True))


def tereference_embed_matches_sentence_transformers(default_server, protocol, eval_set, reference_embed):
    texts = eval_set.titles + [q.text for q in eval_set.queries]
    with client_for(default_server, protocol) as client:
        served = client.embed(texts)
    assert served.shape == (len(texts), 384)
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    assert cosine_rows(served, reference_embed(texts)).min() >= MIN_COSINE[DEFAULT.precision]


def test_rank_orders_like_the_reference_and_keeps_ndcg(default_server, protocol, eval_set, reference_embed):
    titles = eval_set.titles
    inverted_shares = []
    with client_for(default_server, protocol) as client:
        for query in eval_set.queries:
            result = client.rank(query.text, titles)
            reference = reference_embed(titles) @ reference_embed([query.text])[0]
            assert result.scores.shape == (len(titles),) and result.encoder_scores.shape == (1, len(titles))
            assert np.abs(result.scores - reference).max() < SCORE_TOLERANCE
            # every pair of titles (i, j): served the other way round where the signs differ
            served_gap = result.scores[:, None] - result.scores[None, :]
            reference_gap = reference[:, None] - reference[None, :]
            inverted = served_gap * reference_gap < 0
            assert not (inverted & (np.abs(reference_gap) > ORDER_GAP)).any(), query.text
            inverted_shares.append(inverted.sum() / (len(titles) * (len(titles) - 1)))
        served_ndcg = mean_ndcg(eval_set, lambda q, items: client.rank(q, items).scores)
    reference_ndcg = mean_ndcg(eval_set, lambda q, items: reference_embed(items) @ reference_embed([q])[0])
    assert np.mean(inverted_shares) <= MAX_INVERTED
    assert served_ndcg >= reference_ndcg - NDCG_TOLERANCE
    assert reference_ndcg > 0.6  # the eval set is learnable: a sanity floor, not a target


def test_classify_picks_the_most_similar_label(default_server, protocol, eval_set, reference_embed):
    labels = eval_set.category_names
    with client_for(default_server, protocol) as client:
        for title in eval_set.titles[:20]:
            result = client.classify(title, labels)
            reference = reference_embed(labels) @ reference_embed([title])[0]
            best = int(np.argmax(result.scores))  # one encoder: its vote is its best label
            assert result.label == labels[best]
            assert result.votes.tolist() == [int(i == best) for i in range(len(labels))]
            assert np.abs(result.scores - reference).max() < SCORE_TOLERANCE
            assert reference[best] >= reference.max() - LABEL_GAP, title


def test_the_default_keeps_the_full_models_quality(default_server, eval_set, teacher_embed):
    """Issue 18's rule, on the served default: NDCG@5 of `rank` and classify accuracy of `classify` (each title
    against the eval set's categories) within 0.01 and 0.02 of sentence-transformers' full all-MiniLM-L6-v2."""
    with client_for(default_server, "grpc") as client:
        served_ndcg = mean_ndcg(eval_set, lambda q, items: client.rank(q, items).scores)
        served_labels = [client.classify(title, eval_set.category_names).label for title in eval_set.titles]
    served_classify = float(np.mean([label == c for label, c in zip(served_labels, eval_set.categories)]))
    teacher_ndcg = mean_ndcg(eval_set, lambda q, items: teacher_embed(items) @ teacher_embed([q])[0])
    assert served_ndcg >= teacher_ndcg - MAX_NDCG_LOSS, (served_ndcg, teacher_ndcg)
    assert served_classify >= classify_accuracy(eval_set, teacher_embed) - MAX_CLASSIFY_LOSS


def test_same_input_same_answer(default_server):
    """Alone, inside a 32-text request, and under dynamic batching with 16 concurrent clients. `embed`'s
    response cache answers a request it has seen before without running the models, so every request
    after the first carries texts never sent before: each answer below is computed."""
    run = uuid.uuid4().hex[:8]
    probe = f"stainless steel insulated water bottle {run}"
    others = [f"assorted catalog item number {i} {run} with a longer title than the probe" for i in range(31)]

    def neighbour(i: int) -> str:  # unique, and of varied length: the probe is padded differently each time
        return f"concurrent neighbour {i} {run}" + " with a few more words" * (i % 5)

    hits, misses = embed_cache_counts(default_server)
    with client_for(default_server, "grpc") as client:
        alone = client.embed([probe])[0]
        in_batch = client.embed(others[:16] + [probe] + others[16:])[16]
        with ThreadPoolExecutor(16) as pool:
            concurrent = list(
                pool.map(lambda i: client.embed([probe, neighbour(i)] if i % 2 else [neighbour(i)]), range(64))
            )
    assert embed_cache_counts(default_server) == (hits, misses + 2 + 64)  # every request computed
    assert np.abs(in_batch - alone).max() <= 1e-5
    for i, vectors in enumerate(concurrent):
        if i % 2:
            assert np.abs(vectors[0] - alone).max() <= 1e-5, i


def test_truncation_is_counted_in_metrics(default_server):
    long_title = " ".join(f"w{i}" for i in range(200))  # far over max_seq_len=128 tokens, under 2048 bytes
    before = metric_total(default_server, "ecomserve_truncated_texts_total")
    with client_for(default_server, "http") as client:
        client.embed([long_title, "short title", long_title + " variant"])
    assert metric_total(default_server, "ecomserve_truncated_texts_total") == before + 2
