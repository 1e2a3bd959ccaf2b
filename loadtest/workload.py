"""The e-commerce traffic: a product catalog and search queries (loadtest/data) and one request per scenario.

A Call is protocol-free: the model, its inputs and the check its answer must pass; triton_users.py sends it
over HTTP or gRPC, api_requests.py turns it into an HTTP API request. No Locust here.

The catalog scenarios (catalog_search: the `search` model; similar) ask the server's catalog index, which must be
built from this catalog (`ecomserve index build loadtest/data/catalog.csv`): their answers are checked against
it (ids of its items, matching the FILTER sent)."""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import ClassVar

import numpy as np
from answers import Hits, check_classification, check_embeddings, check_hits, check_scores

DATA_DIR = Path(__file__).resolve().parent / "data"
CATALOG_FILE = "catalog.csv"  # id,category,title and, optionally, brand,price,in_stock
QUERIES_FILE = "queries.txt"  # one search query a line
# The user classes' `scenario` names these Workload methods.
SCENARIOS = ("search", "query_embedding", "recommendation", "category", "catalog_search", "similar")
CATALOG_SCENARIOS = ("catalog_search", "similar")  # these ask the catalog index (built from this catalog)
SEARCH_MODES = ("dense", "hybrid", "lexical")  # the search model's MODE values
# Most catalog searches plain dense (the server's default mode), some hybrid and lexical.
DEFAULT_SEARCH_MODES = "dense:8,hybrid:1,lexical:1"
HISTORY_ITEMS = (3, 5)  # similar: a shopper's recent items, this many (inclusive), or one item
_IN_STOCK = {"true": True, "1": True, "false": False, "0": False}
# The suffix count of `unique_texts`, shared by every user of this process (itertools.count is atomic under the GIL).
_FRESH = itertools.count()


@dataclass(frozen=True)
class Item:
    """A catalog item with the fields FILTER can select on (None: the item lacks the field)."""

    id: str
    title: str
    category: str | None = None
    brand: str | None = None
    price: float | None = None
    in_stock: bool | None = None


@dataclass(frozen=True)
class CatalogFilter:
    """A FILTER of the load mix: its JSON text, as sent, and the ids of the catalog items it selects."""

    text: str
    matching: frozenset[str]


@dataclass(frozen=True)
class Catalog:
    titles: tuple[str, ...]
    categories: tuple[str, ...]  # distinct, sorted: classify's LABELS
    queries: tuple[str, ...]
    items: tuple[Item, ...] = ()
    filters: tuple[CatalogFilter, ...] = ()  # each selects at least one item
    titles_by_id: Mapping[str, str] = field(default_factory=dict)
    ids: frozenset[str] = frozenset()


@lru_cache
def load_catalog(directory: Path) -> Catalog:
    catalog_path, queries_path = directory / CATALOG_FILE, directory / QUERIES_FILE
    with catalog_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    queries = [line.strip() for line in queries_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    titles = [row["title"].strip() for row in rows if (row.get("title") or "").strip()]
    categories = sorted({row["category"].strip() for row in rows if (row.get("category") or "").strip()})
    if not titles or len(categories) < 2 or not queries:
        raise ValueError(
            f"{directory}: need titles and at least 2 categories in {CATALOG_FILE} (columns id,category,title) "
            f"and queries in {QUERIES_FILE}; found {len(titles)} titles, {len(categories)} categories, "
            f"{len(queries)} queries"
        )
    items = tuple(_item(row, line, catalog_path) for line, row in enumerate(rows, start=2) if _has_id(row))
    titles_by_id = {item.id: item.title for item in items}
    if len(titles_by_id) != len(items):
        raise ValueError(f"{catalog_path}: an id appears twice")
    return Catalog(
        tuple(titles),
        tuple(categories),
        tuple(queries),
        items,
        catalog_filters(items),
        titles_by_id,
        frozenset(titles_by_id),
    )


def _has_id(row: Mapping[str, str | None]) -> bool:
    return bool((row.get("id") or "").strip() and (row.get("title") or "").strip())


def _item(row: Mapping[str, str | None], line: int, path: Path) -> Item:
    """One row as ecomserve's catalog reader reads it (an empty cell: the item lacks the field)."""
    cells = {name: (row.get(name) or "").strip() for name in ("category", "brand", "price", "in_stock")}
    try:
        price = float(cells["price"]) if cells["price"] else None
        in_stock = _IN_STOCK[cells["in_stock"].lower()] if cells["in_stock"] else None
    except (ValueError, KeyError):
        raise ValueError(
            f"{path}:{line}: price {cells['price']!r} or in_stock {cells['in_stock']!r} unreadable"
        ) from None
    return Item(
        row["id"].strip(), row["title"].strip(), cells["category"] or None, cells["brand"] or None, price, in_stock
    )


def catalog_filters(items: Iterable[Item]) -> tuple[CatalogFilter, ...]:
    """The FILTERs of the load mix, derived from the catalog so that each selects some of its items: every
    category, the four commonest brands and the first two together, in stock, two price ranges, the commonest
    brand's cheapest quarter, and per category a shopper's facet (in stock, at most the category's median price).
    About 30 (`search` keeps the matching rows of 32 filters)."""
    items = tuple(items)
    categories = sorted({item.category for item in items if item.category})
    brands = Counter(item.brand for item in items if item.brand)
    top_brands = sorted(brands, key=lambda brand: (-brands[brand], brand))[:4]
    prices = [item.price for item in items if item.price is not None]
    stocked = any(item.in_stock is not None for item in items)
    wanted: list[dict] = [{"category": category} for category in categories]
    wanted += [{"brand": brand} for brand in top_brands]
    if len(top_brands) >= 2:
        wanted.append({"brand": {"in": top_brands[:2]}})
    if stocked:
        wanted.append({"in_stock": True})
    if len(prices) >= 4:
        low, middle, high = statistics.quantiles(prices, n=4)
        wanted += [{"price": {"lte": round(middle)}}, {"price": {"gte": round(low), "lt": round(high)}}]
        if top_brands:  # a narrow one, likely fewer items than TOP_K: the commonest brand's cheapest
            wanted.append({"brand": top_brands[0], "price": {"lte": round(low)}})
        for category in categories:
            in_category = [item.price for item in items if item.category == category and item.price is not None]
            if in_category:
                facet = {"category": category, "price": {"lte": round(statistics.median(in_category))}}
                wanted.append({**facet, "in_stock": True} if stocked else facet)
    found = []
    for conditions in wanted:
        matching = frozenset(item.id for item in items if matches(item, conditions))
        if matching:
            found.append(CatalogFilter(json.dumps(conditions), matching))
    return tuple(found)


def matches(item: Item, conditions: Mapping[str, object]) -> bool:
    """FILTER's rules for the fields the load mix uses: equality (within a kind), `in`, ranges; an item without
    the field never matches."""
    for name, wanted in conditions.items():
        value = getattr(item, name)
        if value is None:
            return False
        operators = wanted if isinstance(wanted, dict) else {"eq": wanted}
        for operator, operand in operators.items():
            if operator in ("eq", "in"):
                choices = operand if operator == "in" else [operand]
                if not any(_same(value, choice) for choice in choices):
                    return False
            elif not _RANGES[operator](value, operand):
                return False
    return True


def _same(value: object, wanted: object) -> bool:
    """Equal within a kind: 42 is 42.0, but neither "42" nor True."""
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (value, wanted))
    return value == wanted and (numbers or type(value) is type(wanted))


_RANGES = {
    "gte": lambda value, bound: value >= bound,
    "gt": lambda value, bound: value > bound,
    "lte": lambda value, bound: value <= bound,
    "lt": lambda value, bound: value < bound,
}


def parse_search_modes(text: str) -> dict[str, int]:
    """`--search-modes`: "dense:8,hybrid:1,lexical:1" → {"dense": 8, "hybrid": 1, "lexical": 1}; a mode without a
    weight counts 1, weight 0 leaves it out. Raises ValueError naming what is wrong."""
    weights: dict[str, int] = {}
    for part in (part.strip() for part in text.split(",")):
        if not part:
            continue
        mode, _, weight = (piece.strip() for piece in part.partition(":"))
        if mode not in SEARCH_MODES:
            raise ValueError(f"--search-modes {text!r}: unknown mode {mode!r}; use {', '.join(SEARCH_MODES)}")
        if mode in weights:
            raise ValueError(f"--search-modes {text!r}: {mode} given twice")
        try:
            weights[mode] = int(weight) if weight else 1
        except ValueError:
            raise ValueError(f"--search-modes {text!r}: weight {weight!r} of {mode} is not a whole number") from None
        if weights[mode] < 0:
            raise ValueError(f"--search-modes {text!r}: weight of {mode} is negative")
    weights = {mode: weight for mode, weight in weights.items() if weight}
    if not weights:
        raise ValueError(f"--search-modes {text!r}: no mode with a weight above 0")
    return weights


@dataclass(frozen=True)
class TextTensor:
    name: str
    shape: tuple[int, ...]
    texts: tuple[str, ...]  # row-major
    datatype: ClassVar[str] = "BYTES"

    @property
    def values(self) -> tuple[str, ...]:
        return self.texts


@dataclass(frozen=True)
class Int32Tensor:
    name: str
    shape: tuple[int, ...]
    values: tuple[int, ...]
    datatype: ClassVar[str] = "INT32"  # TOP_K; every other public input of the models is BYTES


@dataclass(frozen=True)
class Call:
    name: str  # stable request name without the protocol, e.g. "embed query"
    model: str
    inputs: tuple[TextTensor | Int32Tensor, ...]
    check: Callable[[Mapping[str, np.ndarray]], None]  # raises answers.WrongAnswer
    hits: Hits | None = None  # search and similar: what the answer may hold (api_requests checks it too)


@dataclass(frozen=True)
class WorkloadSettings:
    candidates: int = 20  # rank: titles per search request
    recommend_items: int = 32  # embed: titles per recommendation request
    unique_texts: bool = False  # make every query and title unique, so that embed's response cache misses
    data_dir: Path = DATA_DIR
    top_k: int = 10  # search and similar: TOP_K
    search_modes: str = DEFAULT_SEARCH_MODES  # catalog_search: the MODE mix (parse_search_modes)
    filter_share: float = 0.25  # catalog_search and similar: the share of requests with a FILTER


class Workload:
    """Draws each scenario's next request from the catalog; one per user (random.Random is not shared)."""

    def __init__(self, settings: WorkloadSettings, rng: random.Random | None = None):
        self.settings = settings
        self.catalog = load_catalog(Path(settings.data_dir).resolve())
        self.rng = rng or random.Random()
        modes = parse_search_modes(settings.search_modes)
        self.modes, self.mode_weights = tuple(modes), tuple(modes.values())

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

    def catalog_search(self) -> Call:
        """search: a query against the catalog index, in a MODE of the --search-modes mix, with a FILTER now and
        then; named by both ("search hybrid filtered") so that each shows its own latency."""
        (mode,) = self.rng.choices(self.modes, self.mode_weights)
        chosen = self._filter()
        inputs = [TextTensor("QUERY", (1,), (self._query(),)), Int32Tensor("TOP_K", (1,), (self.settings.top_k,))]
        if chosen is not None:
            inputs.append(TextTensor("FILTER", (1,), (chosen.text,)))
        inputs.append(TextTensor("MODE", (1,), (mode,)))
        hits = Hits(
            top_k=self.settings.top_k,
            catalog=self.catalog.titles_by_id,
            matching=chosen.matching if chosen else self.catalog.ids,
            exact=mode != "lexical",  # lexical returns only items sharing a token with the query
            cosines=mode == "dense",
        )
        name = f"search {mode}{' filtered' if chosen else ''}"
        return Call(name, "search", tuple(inputs), partial(check_hits, hits=hits), hits)

    def similar(self) -> Call:
        """similar: more like one catalog item, or recommended for a history of 3 to 5 (most recent last)."""
        history = self.rng.random() < 0.5
        count = min(self.rng.randint(*HISTORY_ITEMS) if history else 1, len(self.catalog.items))
        ids = tuple(item.id for item in self.rng.sample(self.catalog.items, count))
        chosen = self._filter()
        inputs = [TextTensor("ITEM_IDS", (count,), ids), Int32Tensor("TOP_K", (1,), (self.settings.top_k,))]
        if chosen is not None:
            inputs.append(TextTensor("FILTER", (1,), (chosen.text,)))
        hits = Hits(
            top_k=self.settings.top_k,
            catalog=self.catalog.titles_by_id,
            matching=chosen.matching if chosen else self.catalog.ids,
            excluded=frozenset(ids),
            cosines=True,
        )
        name = f"similar {'history' if history else 'item'}{' filtered' if chosen else ''}"
        return Call(name, "similar", tuple(inputs), partial(check_hits, hits=hits), hits)

    def _filter(self) -> CatalogFilter | None:
        if not self.catalog.filters or self.rng.random() >= self.settings.filter_share:
            return None
        return self.rng.choice(self.catalog.filters)

    def _query(self) -> str:
        return self._fresh(self.rng.choice(self.catalog.queries))

    def _titles(self, count: int) -> tuple[str, ...]:
        titles = self.catalog.titles
        drawn = self.rng.sample(titles, count) if count <= len(titles) else self.rng.choices(titles, k=count)
        return tuple(self._fresh(title) for title in drawn)

    def _fresh(self, text: str) -> str:
        # A catalogue-style number no other text of the run carries: this process's id, then a count shared by its
        # users, all digits (a random number could repeat, and a repeat is a response-cache hit).
        return f"{text} {os.getpid() * 10**7 + next(_FRESH)}" if self.settings.unique_texts else text
