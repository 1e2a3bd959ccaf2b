import numpy as np
import pytest

from ecomserve.fusion import EncoderSlice, encoder_scores, fuse_embeddings, fuse_scores, split_embeddings, vote

SLICES = [EncoderSlice("a", 4, 1.0), EncoderSlice("b", 3, 3.0)]


def unit(rows: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_fused_dot_product_is_weighted_mean_of_cosines():
    a, b = unit(5, 4, 0), unit(5, 3, 1)
    fused = fuse_embeddings([a, b], SLICES)
    assert np.allclose(np.linalg.norm(fused, axis=1), 1.0, atol=1e-6)
    dots = fused[0] @ fused[1:].T
    expected = (1.0 * (a[1:] @ a[0]) + 3.0 * (b[1:] @ b[0])) / 4.0
    assert np.allclose(dots, expected, atol=1e-6)


def test_split_inverts_fuse():
    a, b = unit(3, 4, 2), unit(3, 3, 3)
    back = split_embeddings(fuse_embeddings([a, b], SLICES), SLICES)
    assert np.allclose(back[0], a, atol=1e-6) and np.allclose(back[1], b, atol=1e-6)


def test_fused_scores_per_mode():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4]], dtype=np.float32)
    assert np.allclose(fuse_scores(scores, SLICES, "weighted_mean", 60), (scores[0] + 3 * scores[1]) / 4)
    assert np.allclose(fuse_scores(scores, SLICES, "max", 60), [0.9, 0.8, 0.5])
    # ranks: encoder a → [1, 3, 2], encoder b → [3, 1, 2]
    assert np.allclose(fuse_scores(scores, SLICES, "rrf", 60), [1 / 61 + 1 / 63, 1 / 63 + 1 / 61, 2 / 62])
    with pytest.raises(ValueError):
        fuse_scores(scores, SLICES, "median", 60)


def test_vote_majority_weighted_and_ties():
    trio = [EncoderSlice("a", 1, 1.0), EncoderSlice("b", 1, 1.0), EncoderSlice("c", 1, 5.0)]
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.7]], dtype=np.float32)
    fused = np.array([0.3, 0.6], dtype=np.float32)
    assert vote(scores, trio, "majority", fused)[0] == 0
    assert list(vote(scores, trio, "majority", fused)[1]) == [2, 1]
    assert vote(scores, trio, "weighted", fused)[0] == 1
    # one vote each: the fused score breaks the tie
    label, votes = vote(scores[1:], trio[:2], "majority", fused)
    assert (label, list(votes)) == (1, [1, 1])


def test_encoder_scores_shape():
    q, items = unit(1, 4, 4), unit(6, 4, 5)
    scores = encoder_scores([q, q], [items, items])
    assert scores.shape == (2, 6) and np.allclose(scores[0], items @ q[0])
