"""The e-commerce traffic: a product catalog and search queries (loadtest/data) and one request per scenario.

A Call is protocol-free: the model, its BYTES inputs and the check its answer must pass; triton_users.py sends it
over HTTP or gRPC. No Locust here."""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from answers import check_classification, check_embeddings, check_scores

DATA_DIR = Path(__file__).resolve().parent / "data"
CATALOG_FILE = "catalog.csv"  # id,category,title
QUERIES_FILE = "queries.txt"  # one search query a line
# The user classes' `scenario` names these Workload methods.
SCENARIOS = ("search", "query_embedding", "recommendation", "category")


@dataclass(frozen=True)
class Catalog:
    titles: tuple[str, ...]
    categories: tuple[str, ...]  # distinct, sorted: classify's LABELS
    queries: tuple[str, ...]


@lru_cache
def load_catalog(directory: Path) -> Catalog:
    catalog_path, queries_path = directory / CATALOG_FILE, directory / QUERIES_FILE
    with catalog_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    queries = [line.strip() for line in queries_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    titles = [row["title"].strip() for row in rows if row.get("title", "").strip()]
    categories = sorted({row["category"].strip() for row in rows if row.get("category", "").strip()})
    if not titles or len(categories) < 2 or not queries:
        raise ValueError(
            f"{directory}: need titles and at least 2 categories in {CATALOG_FILE} (columns id,category,title) "
            f"and queries in {QUERIES_FILE}; found {len(titles)} titles, {len(categories)} categories, "
            f"{len(queries)} queries"
        )
    return Catalog(tuple(titles), tuple(categories), tuple(queries))


@dataclass(frozen=True)
class TextTensor:
    name: str
    shape: tuple[int, ...]
    texts: tuple[str, ...]  # row-major; every public input of the models is BYTES


@dataclass(frozen=True)
class Call:
    name: str  # stable request name without the protocol, e.g. "embed query"
    model: str
    inputs: tuple[TextTensor, ...]
    check: Callable[[Mapping[str, np.ndarray]], None]  # raises answers.WrongAnswer


@dataclass(frozen=True)
class WorkloadSettings:
    candidates: int = 20  # rank: titles per search request
    recommend_items: int = 32  # embed: titles per recommendation request
    unique_texts: bool = False  # make every query and title unique, so that embed's response cache misses
    data_dir: Path = DATA_DIR


class Workload:
    """Draws each scenario's next request from the catalog; one per user (random.Random is not shared)."""

    def __init__(self, settings: WorkloadSettings, rng: random.Random | None = None):
        self.settings = settings
        self.catalog = load_catalog(Path(settings.data_dir).resolve())
        self.rng = rng or random.Random()

    def call(self, scenario: str) -> Call:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}: expected one of {', '.join(SCENARIOS)}")
        return getattr(self, scenario)()

    def search(self) -> Call:
        """rank: a query against candidate titles, as a search page re-ranks its retrieved products."""
        query, titles = self._query(), self._titles(self.settings.candidates)
        inputs = (TextTensor("QUERY", (1,), (query,)), TextTensor("CANDIDATES", (len(titles),), titles))
        return Call("rank search", "rank", inputs, partial(check_scores, candidates=len(titles)))

    def query_embedding(self) -> Call:
        """embed: one short query, as vector retrieval does for every search."""
        return Call(
            "embed query", "embed", (TextTensor("TEXT", (1, 1), (self._query(),)),), partial(check_embeddings, texts=1)
        )

    def recommendation(self) -> Call:
        """embed: a page of item titles, as a recommender refreshes item vectors."""
        titles = self._titles(self.settings.recommend_items)
        inputs = (TextTensor("TEXT", (len(titles), 1), titles),)
        return Call("embed items", "embed", inputs, partial(check_embeddings, texts=len(titles)))

    def category(self) -> Call:
        """classify: a new listing's title against the catalog's categories."""
        labels = self.catalog.categories
        inputs = (
            TextTensor("TEXT", (1,), self._titles(1)),
            TextTensor("LABELS", (len(labels),), labels),
        )
        return Call("classify category", "classify", inputs, partial(check_classification, labels=labels))

    def _query(self) -> str:
        return self._fresh(self.rng.choice(self.catalog.queries))

    def _titles(self, count: int) -> tuple[str, ...]:
        titles = self.catalog.titles
        drawn = self.rng.sample(titles, count) if count <= len(titles) else self.rng.choices(titles, k=count)
        return tuple(self._fresh(title) for title in drawn)

    def _fresh(self, text: str) -> str:
        # A random catalogue-style number: a new cache key, barely longer to tokenize.
        return f"{text} {self.rng.randrange(10**6):06d}" if self.settings.unique_texts else text
