"""How several encoders become one answer: fused embeddings, fused scores and votes.

A fused embedding concatenates each encoder's unit vector scaled by sqrt(w_i / sum w), so the dot
product of two fused embeddings is the weighted mean of the per-encoder cosines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ecomserve.spec import SearchFusionSpec


@dataclass(frozen=True)
class EncoderSlice:
    name: str
    dim: int
    weight: float


def _scales(slices: list[EncoderSlice]) -> np.ndarray:
    weights = np.array([s.weight for s in slices], dtype=np.float64)
    return np.sqrt(weights / weights.sum()).astype(np.float32)


def fuse_embeddings(per_encoder: list[np.ndarray], slices: list[EncoderSlice]) -> np.ndarray:
    """[batch, dim_i] unit vectors per encoder → [batch, sum dim_i] fused, unit-norm embedding."""
    return np.concatenate([vec * scale for vec, scale in zip(per_encoder, _scales(slices))], axis=1)


def split_embeddings(fused: np.ndarray, slices: list[EncoderSlice]) -> list[np.ndarray]:
    """Inverse of fuse_embeddings: each encoder's unit vectors back out of the fused ones."""
    parts, start = [], 0
    for s, scale in zip(slices, _scales(slices)):
        parts.append(fused[:, start : start + s.dim] / scale)
        start += s.dim
    return parts


def encoder_scores(query: list[np.ndarray], items: list[np.ndarray]) -> np.ndarray:
    """Cosine of one query to each item, per encoder: [encoders, items]."""
    return np.stack([item @ q[0] for q, item in zip(query, items)]).astype(np.float32)


def fuse_scores(scores: np.ndarray, slices: list[EncoderSlice], mode: str, rrf_k: int) -> np.ndarray:
    """[encoders, items] cosines → [items] fused score; higher is better in every mode."""
    weights = np.array([s.weight for s in slices], dtype=np.float32)
    if mode == "weighted_mean":
        return (weights @ scores / weights.sum()).astype(np.float32)
    if mode == "max":
        return scores.max(axis=0)
    if mode == "rrf":
        # Rank 1 is the best item of that encoder; ties keep input order.
        ranks = np.argsort(np.argsort(-scores, axis=1, kind="stable"), axis=1) + 1
        return (1.0 / (rrf_k + ranks)).sum(axis=0).astype(np.float32)
    raise ValueError(f"unknown fusion mode {mode!r}")


def query_scores(fused: np.ndarray, slices: list[EncoderSlice], mode: str, rrf_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fused embeddings of one query (row 0) and its items (the rest) → per-encoder cosines [encoders, items]
    and the fused score per item."""
    per_encoder = split_embeddings(fused, slices)
    scores = encoder_scores([p[:1] for p in per_encoder], [p[1:] for p in per_encoder])
    return scores, fuse_scores(scores, slices, mode, rrf_k)


def vote(scores: np.ndarray, slices: list[EncoderSlice], mode: str, fused: np.ndarray) -> tuple[int, np.ndarray]:
    """Each encoder votes for its best label; returns (winning label index, votes per label).

    `majority` counts one vote per encoder, `weighted` counts the encoder's weight; a tie goes to the
    tied label with the highest fused score."""
    choices = scores.argmax(axis=1)
    votes = np.bincount(choices, minlength=scores.shape[1]).astype(np.int32)
    weights = np.array([s.weight for s in slices]) if mode == "weighted" else np.ones(len(slices))
    tally = np.bincount(choices, weights=weights, minlength=scores.shape[1])
    tied = np.flatnonzero(np.isclose(tally, tally.max()))
    winner = int(tied[np.argmax(fused[tied])])
    return winner, votes


def fuse_rankings(
    rankings: list[list[tuple[str, float]]], weights: list[float], mode: str, rrf_k: int
) -> list[tuple[str, float]]:
    """Several retrievers' (id, score) lists, each best first → one list of (id, fused score), best first.

    `rrf`: Σᵢ wᵢ / (rrf_k + rankᵢ) over the lists an id is in (rank 1 is a list's best), so only positions count.
    `weighted`: Σᵢ wᵢ·sᵢ / Σᵢ wᵢ, sᵢ the id's score min-max normalised within list i (1 its best, 0 its worst or
    absent; a list of equal scores gives 1 to each). Ties keep the order of first appearance (list 0 first)."""
    fused: dict[str, float] = {}
    total = sum(weights) or 1.0
    for hits, weight in zip(rankings, weights):
        if mode == "rrf":
            for rank, (item, _) in enumerate(hits, start=1):
                fused[item] = fused.get(item, 0.0) + weight / (rrf_k + rank)
        elif mode == "weighted":
            scores = np.array([score for _, score in hits], dtype=np.float64)
            low, span = (scores.min(), np.ptp(scores)) if len(hits) else (0.0, 0.0)
            for (item, _), score in zip(hits, scores):
                normalised = (score - low) / span if span > 0 else 1.0
                fused[item] = fused.get(item, 0.0) + weight * normalised / total
        else:
            raise ValueError(f"unknown fusion mode {mode!r}")
    order = sorted(fused, key=lambda item: -fused[item])  # stable: first appearance breaks ties
    return [(item, fused[item]) for item in order]


def fuse_hybrid(
    query: str,
    lexical: list[tuple[str, float]],
    dense: list[tuple[str, float]],
    fusion: SearchFusionSpec,
    top_k: int,
) -> list[tuple[str, float]]:
    """`search`'s hybrid mode: the BM25 and dense lists fused, BM25 weighted by the query (a digit in it or not).
    Lexical first: an exact tie (an item only one list has, at the same rank as another only the other list has)
    goes to the item whose words match the query, such as a model number the encoder cannot tell apart."""
    weights = [fusion.lexical_weight_for(query), 1.0]
    return fuse_rankings([lexical, dense], weights, fusion.mode, fusion.rrf_k)[:top_k]
