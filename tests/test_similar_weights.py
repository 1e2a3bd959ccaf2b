"""The `similar` model's recency weighting (ecomserve.index.history) and its spec fields; the model itself is
tested on real servers in tests/test_search.py."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from ecomserve.index.history import diverse_order, history_profile, recency_weights
from ecomserve.spec import SearchSpec


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def test_weights_halve_every_half_life_items_back():
    np.testing.assert_allclose(recency_weights(5, 2.0), [0.25, 0.5**1.5, 0.5, 0.5**0.5, 1.0])
    np.testing.assert_allclose(recency_weights(3, 1.0), [0.25, 0.5, 1.0])
    assert recency_weights(1, 5.0).tolist() == [1.0]
    with pytest.raises(ValueError, match="half_life"):
        recency_weights(3, 0)


def test_one_items_profile_is_its_own_vector():
    vector = unit(np.random.default_rng(1).standard_normal(16))
    np.testing.assert_allclose(history_profile(vector[None, :], 5.0), vector, atol=1e-6)


def test_the_profile_is_the_renormalised_weighted_sum():
    rng = np.random.default_rng(2)
    vectors = unit(rng.standard_normal((4, 16)))
    half_life = 3.0
    weights = [0.5 ** (3 / half_life), 0.5 ** (2 / half_life), 0.5 ** (1 / half_life), 1.0]
    expected = unit(sum(w * v for w, v in zip(weights, vectors)))
    profile = history_profile(vectors, half_life)
    assert profile.dtype == np.float32
    np.testing.assert_allclose(profile, expected, atol=1e-6)
    assert abs(float(np.linalg.norm(profile)) - 1.0) < 1e-6
    # The most recent item pulls hardest: the profile is closer to it than to the oldest.
    assert float(profile @ vectors[-1]) > float(profile @ vectors[0])


def test_an_item_seen_twice_counts_twice():
    rng = np.random.default_rng(3)
    a, b = unit(rng.standard_normal((2, 8)))
    profile = history_profile(np.stack([a, b, a]), 1.0)
    np.testing.assert_allclose(profile, unit(0.25 * a + 0.5 * b + a), atol=1e-6)


def test_a_history_that_cancels_out_falls_back_to_the_most_recent_item():
    vector = unit(np.arange(1.0, 9.0))
    np.testing.assert_allclose(history_profile(np.stack([-vector, vector]), 1e9), vector, atol=1e-6)
    with pytest.raises(ValueError, match="vectors"):
        history_profile(np.empty((0, 8)), 1.0)


def test_the_spec_bounds_the_history():
    spec = SearchSpec()
    assert spec.max_history == 20 and spec.history_half_life == 5.0
    for bad in ({"max_history": 0}, {"max_history": 1001}, {"history_half_life": 0}):
        with pytest.raises(ValidationError):
            SearchSpec(**bad)


def test_diversity_passes_over_near_copies_of_a_picked_item():
    # a and its near-copy a2 lead on relevance; b is less relevant but unlike a.
    a, a2, b = np.array([1.0, 0.0]), np.array([0.995, np.sqrt(1 - 0.995**2)]), np.array([0.0, 1.0])
    vectors, relevance = np.stack([a, a2, b]), np.array([0.9, 0.89, 0.7])
    assert diverse_order(relevance, vectors, 3, 0.0) == [0, 1, 2]  # d = 0: by relevance alone
    # d = 0.5, second pick: a2 gains 0.5·0.89 - 0.5·0.995 < 0, b gains 0.5·0.7 - 0.5·0 > 0.
    assert diverse_order(relevance, vectors, 3, 0.5) == [0, 2, 1]
    assert diverse_order(relevance, vectors, 2, 1.0) == [0, 2]  # d = 1: least alike to what is picked
    assert diverse_order(relevance, vectors, 5, 0.5) == [0, 2, 1]  # k beyond the candidates: all of them
    assert diverse_order(relevance[:0], vectors[:0], 3, 0.5) == []


def test_diversity_must_be_within_zero_and_one():
    with pytest.raises(ValueError, match="diversity"):
        diverse_order(np.ones(2), np.eye(2), 2, 1.5)
    with pytest.raises(ValidationError):
        SearchSpec(diversity=-0.1)
    with pytest.raises(ValidationError):
        SearchSpec(diversity_candidates=0)
