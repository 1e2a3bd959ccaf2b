"""What the points of `ecomserve bench --workload search` ask, and how their answers are checked: the FILTER cases
with their exact answers among the matching items, the answer check (recall@10, min(10, matching) results, every
result matching), the BM25 index's build and the hybrid call, composed as the `search` model composes it.

The filter path is the served one: `parse_filter` turns each FILTER object into the `ItemFilter` that
`VectorIndex.search` and `LexicalIndex.allowed_rows` take, and the index holds each item's fields as
`ecomserve index build` gives them."""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from ecomserve.bench.catalogs import BENCH_FILTERS, K, exact_neighbours, item_row, recall_at_k
from ecomserve.fusion import fuse_hybrid
from ecomserve.index.filters import ItemFilter, parse_filter
from ecomserve.index.lexical import LexicalIndex
from ecomserve.index.vector_index import VectorIndex
from ecomserve.spec import SearchFusionSpec

BATCH = 100  # queries per request in the answer check: Milvus takes the batch as one gRPC message


def rss_mb(pid: int | None = None) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def disk_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


@dataclass(frozen=True)
class FilterCase:
    """One FILTER over one catalog (or none: every item), with the exact top-K among the items it matches."""

    label: str  # the target selectivity ("1%"), or "" for no filter
    where: ItemFilter | None
    text: str | None  # the FILTER object as JSON, as a client sends it
    matching: np.ndarray  # bool per row
    truth: list[list[str]]  # per query, the exact top-K ids among the matching rows

    @property
    def share(self) -> float:
        return float(self.matching.mean()) if len(self.matching) else 0.0


def unfiltered_case(ids: Sequence[str], truth: list[list[str]]) -> FilterCase:
    return FilterCase("", None, None, np.ones(len(ids), bool), truth)


def filter_cases(
    ids: Sequence[str], fields: Sequence[dict], vectors: np.ndarray, queries: np.ndarray
) -> list[FilterCase]:
    """A FilterCase per BENCH_FILTERS entry. Which items match is ItemFilter.matches on each item's fields (the
    filter language's definition); their exact top-K is brute force over those rows' vectors only."""
    cases = []
    for label, wanted in BENCH_FILTERS.items():
        text = json.dumps(wanted)
        where = parse_filter(text)
        matching = np.fromiter((where.matches(found) for found in fields), bool, len(fields))
        top = exact_neighbours(vectors, queries, K, rows=np.flatnonzero(matching))
        cases.append(FilterCase(label, where, text, matching, [[ids[row] for row in rows] for rows in top]))
    return cases


def search_all(index: VectorIndex, queries: np.ndarray, where: ItemFilter | None) -> list[list[str]]:
    found = []
    for start in range(0, len(queries), BATCH):
        found += [[item for item, _ in hits] for hits in index.search(queries[start : start + BATCH], K, where)]
    return found


def answer_quality(index: VectorIndex, queries: np.ndarray, case: FilterCase) -> dict:
    """Every query's answer under `case`: recall@K against its exact answer, how many queries got other than
    min(K, matching) results (a filtered HNSW walk can come back short), and how many results fail the filter."""
    found = search_all(index, queries, case.where)
    want = min(K, int(case.matching.sum()))
    return {
        "recall_at_10": recall_at_k(found, case.truth, K),
        "short_results": sum(len(hits) != want for hits in found),
        "filter_violations": sum(not case.matching[item_row(item)] for hits in found for item in hits),
    }


def build_lexical(ids: Sequence[str], titles: Sequence[str], fields: Sequence[dict], scratch: Path) -> tuple:
    """The BM25 index `ecomserve index build` commits with the vectors (titles; the items' fields are its extras,
    which add the brand to the indexed text), with its build time, this process's RSS growth and its size on disk."""
    by_id, extras = dict(zip(ids, titles)), dict(zip(ids, fields))
    gc.collect()  # the previous scale's index is returned first, so it does not hide this one's growth
    before, began = rss_mb(), time.perf_counter()
    lexical = LexicalIndex.build(by_id, extras)
    build = {"build_s": time.perf_counter() - began, "rss_growth_mb": rss_mb() - before}
    folder = scratch / "bm25"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    lexical.save(folder)
    build["disk_mb"] = disk_mb(folder)
    shutil.rmtree(folder)
    return lexical, build


def lexical_call(lexical: LexicalIndex, texts: Sequence[str]) -> Callable[[int], object]:
    """The `search` model's lexical mode, unfiltered: tokenising and scoring the query is in the call."""
    return lambda i: lexical.search(texts[i % len(texts)], K)


def hybrid_call(
    lexical: LexicalIndex, index: VectorIndex, fusion: SearchFusionSpec, texts: Sequence[str], vectors: np.ndarray
) -> Callable[[int], object]:
    """The `search` model's hybrid mode (serving_models/search.py `_search`), unfiltered, with the query vector
    precomputed as the dense rows have it: each retriever's top `fusion.candidates_for(K)`, the lexical list first,
    fused by fusion.fuse_hybrid. (The model's check that each id still has
    a title is left out: every id here has one.)"""
    wanted = fusion.candidates_for(K)

    def call(i: int) -> list[tuple[str, float]]:
        text = texts[i % len(texts)]
        lexical_hits = lexical.search(text, wanted)
        dense_hits = index.search(vectors[i % len(vectors)][None, :], wanted)[0]
        return fuse_hybrid(text, lexical_hits, dense_hits, fusion, K)

    return call
