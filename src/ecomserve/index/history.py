"""A shopper's recent items as one query vector, for the `similar` model (similar items and recommendations).

Items come oldest first, most recent last. Item i's weight is wᵢ = 0.5^(aᵢ / half_life), where aᵢ is how many
items came after it (0 for the most recent), so the weight halves every `half_life` items back. The profile is
p = Σᵢ wᵢ·vᵢ / ‖Σᵢ wᵢ·vᵢ‖ over the items' stored unit vectors vᵢ; an index's inner product with p is then the
cosine to the profile. One item's profile is its own vector. An item seen twice counts twice.

`diverse_order` reorders the index's candidates by maximal marginal relevance (Carbonell & Goldstein, 1998): each
next pick maximises (1 - d)·relevance - d·(its highest cosine to an item already picked), so with d > 0 a
near-copy of a picked item gives way to a less similar but different one; d = 0 keeps the similarity order."""

from __future__ import annotations

import numpy as np


def recency_weights(count: int, half_life: float) -> np.ndarray:
    """wᵢ for `count` items, oldest first: [0.5^((count-1)/h), …, 0.5^(1/h), 1]."""
    if half_life <= 0:
        raise ValueError(f"half_life must be positive, got {half_life}")
    ages = np.arange(count - 1, -1, -1, dtype=np.float64)
    return np.power(0.5, ages / half_life)


def history_profile(vectors: np.ndarray, half_life: float) -> np.ndarray:
    """The unit profile vector of `vectors` ([n, dim], oldest first). Where the weighted sum cancels out
    (opposite vectors), the most recent item's vector stands in for it."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or not len(vectors):
        raise ValueError(f"vectors must be [n >= 1, dim], got shape {list(vectors.shape)}")
    combined = recency_weights(len(vectors), half_life) @ vectors
    norm = float(np.linalg.norm(combined))
    if norm < 1e-6:
        combined, norm = vectors[-1], float(np.linalg.norm(vectors[-1])) or 1.0
    return (combined / norm).astype(np.float32)


def diverse_order(relevance: np.ndarray, vectors: np.ndarray, k: int, diversity: float) -> list[int]:
    """The rows of k candidates in MMR order. `relevance`: [n] each candidate's cosine to the profile, best
    first; `vectors`: [n, dim] their unit vectors; `diversity`: d in [0, 1]."""
    if not 0 <= diversity <= 1:
        raise ValueError(f"diversity must be within [0, 1], got {diversity}")
    relevance = np.asarray(relevance, dtype=np.float64)
    vectors = np.asarray(vectors, dtype=np.float64)
    count = min(k, len(relevance))
    if count == 0:
        return []
    picked = [int(np.argmax(relevance))]
    closest = vectors @ vectors[picked[0]]  # each candidate's highest cosine to a picked item so far
    while len(picked) < count:
        gain = (1 - diversity) * relevance - diversity * closest
        gain[picked] = -np.inf
        row = int(np.argmax(gain))  # ties: the earlier (more similar) candidate
        picked.append(row)
        closest = np.maximum(closest, vectors @ vectors[row])
    return picked
