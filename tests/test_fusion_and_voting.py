"""Several encoders in one pipeline, served: fused embeddings, fused scores and votes."""

from __future__ import annotations

import numpy as np
import pytest
from support import TorchReference, client_for, cosine_rows

from ecomserve.evaluation import load_eval_set
from ecomserve.spec import resolve_source

pytestmark = pytest.mark.integration

BUNDLED = "bundled:all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def ensemble_references():
    """export/ensemble.yaml's encoders in PyTorch, and their weights."""
    return [TorchReference(BUNDLED), TorchReference(BUNDLED, keep_layers=3)], np.array([2.0, 1.0])


def test_fused_embedding_dot_is_weighted_mean_of_encoder_cosines(ensemble_server, ensemble_references):
    references, weights = ensemble_references
    texts = ["wireless earbuds", "bluetooth headphones with mic", "cast iron skillet", "yoga mat non slip"]
    with client_for(ensemble_server, "http") as client:
        fused = client.embed(texts)
    assert fused.shape == (4, 768)
    assert np.allclose(np.linalg.norm(fused, axis=1), 1.0, atol=1e-5)
    per_encoder = [r.embed(texts) for r in references]
    scales = np.sqrt(weights / weights.sum())
    for i, vectors in enumerate(per_encoder):
        part = fused[:, 384 * i : 384 * (i + 1)] / scales[i]
        assert cosine_rows(part, vectors).min() >= 0.9999
    # the full encoder's slice is what sentence-transformers computes for the same weights
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(resolve_source(BUNDLED)), device="cpu").encode(texts, normalize_embeddings=True)
    assert cosine_rows(fused[:, :384] / scales[0], st).min() >= 0.9999
    expected = sum(w * (v @ v[0]) for w, v in zip(weights, per_encoder)) / weights.sum()
    assert np.abs(fused @ fused[0] - expected).max() < 1e-5


def test_rank_reports_each_encoder_and_their_weighted_mean(ensemble_server, ensemble_references, protocol):
    references, weights = ensemble_references
    query, candidates = "running shoes", ["trail running shoe for men", "espresso machine", "sneakers", "hiking boots"]
    with client_for(ensemble_server, protocol) as client:
        result = client.rank(query, candidates)
    expected = np.stack([r.embed(candidates) @ r.embed([query])[0] for r in references])
    assert result.encoder_scores.shape == (2, 4)
    assert np.abs(result.encoder_scores - expected).max() < 1e-4
    assert np.abs(result.scores - weights @ expected / weights.sum()).max() < 1e-4


def test_classify_when_the_two_encoders_disagree(ensemble_server, ensemble_references):
    """One vote each: the label with the higher fused score wins, and VOTES shows the split."""
    references, weights = ensemble_references
    eval_set = load_eval_set()
    labels = eval_set.category_names
    label_vectors = [r.embed(labels) for r in references]
    title_vectors = [r.embed(eval_set.titles) for r in references]
    disagreements = []
    for t, title in enumerate(eval_set.titles):
        scores = np.stack([lv @ tv[t] for lv, tv in zip(label_vectors, title_vectors)])
        choices = scores.argmax(axis=1)
        if choices[0] != choices[1]:
            disagreements.append((title, choices, weights @ scores / weights.sum()))
    assert disagreements, "the full and pruned encoders never disagree on the eval set"
    with client_for(ensemble_server, "grpc") as client:
        for title, choices, fused in disagreements[:5]:
            result = client.classify(title, labels)
            assert sorted(np.flatnonzero(result.votes)) == sorted(choices)
            assert result.votes.sum() == 2
            assert result.label == labels[choices[np.argmax(fused[choices])]]
            assert np.abs(result.scores - fused).max() < 1e-4


def test_majority_of_three_encoders(trio_server, trio_sources):
    """Three tiny encoders: where two agree and one dissents, the pair's label wins 2 votes to 1."""
    references = [TorchReference(str(source), max_seq_len=32) for source in trio_sources]
    eval_set = load_eval_set()
    labels, texts = eval_set.category_names, eval_set.titles
    label_vectors = [r.embed(labels) for r in references]
    text_vectors = [r.embed(texts) for r in references]
    splits = []
    for t, title in enumerate(texts):
        choices = [int(np.argmax(lv @ tv[t])) for lv, tv in zip(label_vectors, text_vectors)]
        if len(set(choices)) == 2:
            majority = max(set(choices), key=choices.count)
            splits.append((title, majority, (set(choices) - {majority}).pop()))
    assert splits, "no 2-to-1 split between the tiny encoders on the eval titles"
    with client_for(trio_server, "http") as client:
        for title, majority, minority in splits[:5]:
            result = client.classify(title, labels)
            assert result.label == labels[majority]
            assert result.votes[majority] == 2 and result.votes[minority] == 1
