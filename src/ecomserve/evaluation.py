"""Ranking quality on the shipped relevance set (package data: ecomserve/data/eval/relevance.json): NDCG@k."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecomserve.paths import eval_set_text


@dataclass(frozen=True)
class EvalQuery:
    text: str
    relevance: dict[str, int]  # product id → grade 1..3; unlisted products are 0


@dataclass(frozen=True)
class EvalSet:
    product_ids: list[str]
    titles: list[str]
    categories: list[str]  # per product
    category_names: list[str]
    queries: list[EvalQuery]

    def gains(self, query: EvalQuery) -> np.ndarray:
        return np.array([query.relevance.get(pid, 0) for pid in self.product_ids], dtype=np.float64)


def load_eval_set(path: Path | None = None) -> EvalSet:
    """The relevance set in `path`, or the one the package ships."""
    data = json.loads(eval_set_text() if path is None else Path(path).read_text())
    products = data["products"]
    return EvalSet(
        product_ids=[p["id"] for p in products],
        titles=[p["title"] for p in products],
        categories=[p["category"] for p in products],
        category_names=list(data["categories"]),
        queries=[EvalQuery(q["text"], {k: int(v) for k, v in q["relevance"].items()}) for q in data["queries"]],
    )


def ndcg_at_k(scores: Sequence[float], gains: np.ndarray, k: int = 5) -> float:
    """NDCG@k with exponential gain (2^g - 1); ties in `scores` keep input order."""
    order = np.argsort(-np.asarray(scores), kind="stable")[:k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float(((2.0 ** gains[order] - 1) * discounts[: len(order)]).sum())
    ideal = np.sort(gains)[::-1][:k]
    idcg = float(((2.0**ideal - 1) * discounts[: len(ideal)]).sum())
    return dcg / idcg if idcg > 0 else 0.0


def mean_ndcg(eval_set: EvalSet, score: Callable[[str, list[str]], Sequence[float]], k: int = 5) -> float:
    """Mean NDCG@k over the queries, ranking all products with `score(query, titles)`."""
    values = [ndcg_at_k(score(q.text, eval_set.titles), eval_set.gains(q), k) for q in eval_set.queries]
    return float(np.mean(values))
