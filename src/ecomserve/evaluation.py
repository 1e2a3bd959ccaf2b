"""Ranking quality on the shipped eval sets (package data: ecomserve/data/eval/): NDCG@k.

relevance.json: 60 products and 20 semantic queries (grades 0-3). typed.json (issue 17): 50 near-duplicate
products (siblings that differ by model number, size or capacity, with brand, price, stock and attributes) and
typed queries over relevance.json's products plus those: `lexical` (model numbers, sizes, capacities) and
`filtered` (a query and a FILTER object, judged within the filter). `typed_ndcg` scores any retriever's ranked ids
per query type; tests/test_eval_types.py runs it on the default pipeline's `search` (README, "Quality so far")."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecomserve.paths import eval_set_text, typed_eval_set_text


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


def classify_accuracy(eval_set: EvalSet, embed: Callable[[list[str]], np.ndarray]) -> float:
    """Share of the products whose title is nearest its own category name among all of them, as `classify`
    labels a text with one encoder (issue 18's second quality bound, beside NDCG@5)."""
    labels, titles = embed(eval_set.category_names), embed(eval_set.titles)
    picked = np.argmax(titles @ labels.T, axis=1)
    return float(np.mean([eval_set.category_names[i] == c for i, c in zip(picked, eval_set.categories)]))


QUERY_TYPES = ("semantic", "lexical", "filtered")


@dataclass(frozen=True)
class TypedQuery:
    text: str
    type: str  # one of QUERY_TYPES
    relevance: dict[str, int]  # product id → grade; unlisted products are 0
    filter: dict | None = None  # a FILTER object (ecomserve.index.filters) for `filtered` queries


@dataclass(frozen=True)
class SimilarJudgment:
    """What a shopper would want shown next to `item_ids` (one item or a history, most recent last)."""

    item_ids: list[str]
    relevance: dict[str, int]  # product id → grade (never one of item_ids); unlisted products are 0


@dataclass(frozen=True)
class TypedEvalSet:
    semantic: EvalSet  # relevance.json: its queries run over its own 60 products
    products: list[dict]  # the typed queries' catalog: relevance.json's products (id, title, category) + typed.json's
    queries: list[TypedQuery]  # every query, semantic ones first
    similar: list[SimilarJudgment]  # over the same catalog as the lexical and filtered queries

    def of_type(self, query_type: str) -> list[TypedQuery]:
        return [q for q in self.queries if q.type == query_type]


def load_typed_eval_set() -> TypedEvalSet:
    """relevance.json's semantic queries and typed.json's lexical and filtered ones, as the package ships them."""
    semantic = load_eval_set()
    data = json.loads(typed_eval_set_text())
    base = [
        {"id": pid, "title": title, "category": category}
        for pid, title, category in zip(semantic.product_ids, semantic.titles, semantic.categories)
    ]
    queries = [TypedQuery(q.text, "semantic", dict(q.relevance)) for q in semantic.queries]
    for q in data["queries"]:
        relevance = {k: int(v) for k, v in q["relevance"].items()}
        queries.append(TypedQuery(q["text"], q["type"], relevance, q.get("filter")))
    similar = [
        SimilarJudgment(list(j["item_ids"]), {k: int(v) for k, v in j["relevance"].items()}) for j in data["similar"]
    ]
    return TypedEvalSet(semantic, base + list(data["products"]), queries, similar)


def ranked_ndcg(ids: Sequence[str], relevance: dict[str, int], k: int = 5) -> float:
    """NDCG@k (exponential gain, as ndcg_at_k) of a retriever's ranked ids; the ideal is over every judged item, and
    a retriever returning fewer than k ids gains nothing for the missing places."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = sum((2.0 ** relevance.get(item, 0) - 1) * d for item, d in zip(ids[:k], discounts))
    ideal = sorted(relevance.values(), reverse=True)[:k]
    idcg = sum((2.0**grade - 1) * d for grade, d in zip(ideal, discounts))
    return float(dcg / idcg) if idcg > 0 else 0.0


def typed_ndcg(
    queries: Sequence[TypedQuery], ranked: Callable[[TypedQuery, str], Sequence[str]], modes: Sequence[str], k: int = 5
) -> dict[str, dict[str, float]]:
    """Mean NDCG@k per query type and mode: {type: {mode: mean}}, `ranked(query, mode)` the ids a mode returns."""
    table: dict[str, dict[str, float]] = {}
    for query_type in QUERY_TYPES:
        typed = [q for q in queries if q.type == query_type]
        if typed:
            table[query_type] = {
                mode: float(np.mean([ranked_ndcg(ranked(q, mode), q.relevance, k) for q in typed])) for mode in modes
            }
    return table


def format_table(table: dict[str, dict[str, float]], counts: dict[str, int] | None = None) -> str:
    """A markdown table: a row per query type, a column per mode."""
    modes = list(next(iter(table.values())))
    lines = ["| query type | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for query_type, row in table.items():
        label = f"{query_type} ({counts[query_type]})" if counts else query_type
        lines.append(f"| {label} | " + " | ".join(f"{row[mode]:.3f}" for mode in modes) + " |")
    return "\n".join(lines)
