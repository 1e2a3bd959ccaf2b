"""The synthetic catalogs of `ecomserve bench --workload search`: titles grown from the shipped ones, item ids,
each item's filterable fields and the FILTERs of the filtered rows, noisy copies of embedded vectors for scales
beyond EMBED_MAX, exact neighbours by brute force (over every item or only the matching ones), and recall@k."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from ecomserve.paths import corpus_lines

K = 10
EMBED_MAX = 100_000  # larger catalogs take too long to embed on 2 cores: their vectors are synthetic
NOISE_SIGMA = 0.01  # per component: a noisy copy keeps cosine ≈ 0.98 to its source vector at dim 384
ADD_CHUNK = 20_000  # rows per upsert: progress steps, and bounded temporaries at 1M rows

# Attribute words for synthetic titles; the brands are invented so no real product is implied.
COLOURS = ("Black", "White", "Navy", "Red", "Forest Green", "Grey", "Beige", "Sky Blue", "Pink", "Olive")
COLOURS += ("Burgundy", "Charcoal", "Mustard", "Teal", "Lavender", "Sand")
SIZES = ("XS", "S", "M", "L", "XL", "XXL", "Small", "Medium", "Large", "One Size")
MATERIALS = ("Cotton", "Stainless Steel", "Bamboo", "Silicone", "Leather", "Recycled Plastic", "Oak", "Linen")
MATERIALS += ("Aluminium", "Wool", "Glass", "Ceramic")
BRANDS = ("Norvik", "Alderlane", "Quillon", "Brightmoor", "Tessaro", "Kelvra", "Ombrie", "Fenwick & Hale")
BRANDS += ("Lumora", "Paxton Goods", "Verdant Co.", "Haldor", "Ziva", "Corvell", "Sunnet", "Marlowe Home")
BRANDS += ("Trekka", "Ivoria", "Bellhaven", "Rusk & Co.", "Nordley", "Calyx", "Ondine", "Vantor")
PACKS = (2, 3, 4, 5, 6, 8, 10, 12, 24)
# Ten categories drawn uniformly and independently of the title: a category filter keeps ~10 % of any query's
# neighbours, the uncorrelated case of filtered-ANN benchmarks (a correlated filter would be easier for HNSW).
CATEGORIES = ("Electronics", "Home & Kitchen", "Sports", "Clothing", "Beauty", "Toys", "Garden", "Office")
CATEGORIES += ("Automotive", "Books")
PRICE_RANGE = (1.0, 1000.0)  # uniform: a price bound selects its share of the range
FIELDS_STREAM = 1  # the fields' random stream, apart from the titles' (seed) and the noise's
# The FILTERs of the filtered rows, by target selectivity under item_fields' distributions: a category and a
# price range (1/10 × 99/999 ≈ 1 %), one category (10 %), in stock (50 %). Each row reports the actual share.
BENCH_FILTERS = {
    "1%": {"category": CATEGORIES[0], "price": {"lt": 100}},
    "10%": {"category": CATEGORIES[1]},
    "50%": {"in_stock": True},
}


# ---------------------------------------------------------------------------------------------------------------
# Synthetic catalog


def shipped_titles() -> list[str]:
    return corpus_lines("titles.txt")


def shipped_queries() -> list[str]:
    return corpus_lines("queries.txt")


def synthetic_titles(base: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """n distinct titles: a brand, a shipped title, and optional colour, material, size and pack count.
    One seeded stream draws them in order, so the first m titles are the same for every n ≥ m: a smaller
    scale is a prefix of a larger one, and cached vectors of one serve the other."""
    rng = random.Random(seed)
    seen: set[str] = set()
    titles: list[str] = []
    while len(titles) < n:
        title = _compose(rng, base)
        if title not in seen:
            seen.add(title)
            titles.append(title)
    return titles


def _compose(rng: random.Random, base: Sequence[str]) -> str:
    parts = [f"{rng.choice(BRANDS)} {rng.choice(base)}"]
    # Each attribute appears half the time, so titles vary in length as real listings do.
    if rng.random() < 0.5:
        parts.append(rng.choice(COLOURS))
    if rng.random() < 0.5:
        parts.append(rng.choice(MATERIALS))
    if rng.random() < 0.5:
        parts.append(f"Size {rng.choice(SIZES)}")
    if rng.random() < 0.5:
        parts.append(f"Pack of {rng.choice(PACKS)}")
    return ", ".join(parts)


def item_ids(n: int) -> list[str]:
    return [f"sku-{row}" for row in range(n)]


def item_row(item_id: str) -> int:
    """The row of an `item_ids` id."""
    return int(item_id.removeprefix("sku-"))


def catalog_titles(titles: Sequence[str], n: int) -> list[str]:
    """n items' titles: beyond the embedded titles, row r is a noisy copy of row r % len(titles) (expand_vectors)
    and takes its title, so BM25 and the vectors describe the same item."""
    return [titles[row % len(titles)] for row in range(n)]


def title_brand(title: str) -> str:
    """The brand _compose put first in a synthetic title."""
    return next(brand for brand in BRANDS if title.startswith(brand + " "))


def item_fields(titles: Sequence[str], seed: int = 0) -> list[dict]:
    """Each item's filterable catalog fields (what `CatalogItem.filter_fields()` gives the index): the brand of its
    title, and a category, price and stock flag drawn from a seeded stream. Plain Python values, as a parsed
    catalog has them (the filter compares kinds: a numpy bool is not a JSON boolean)."""
    rng = np.random.default_rng([seed, FIELDS_STREAM])
    n = len(titles)
    categories = rng.integers(0, len(CATEGORIES), n).tolist()
    prices = np.round(rng.uniform(*PRICE_RANGE, n), 2).tolist()
    in_stock = (rng.random(n) < 0.5).tolist()
    brands = {title: title_brand(title) for title in set(titles)}
    return [
        {"category": CATEGORIES[c], "brand": brands[t], "price": p, "in_stock": s}
        for c, t, p, s in zip(categories, titles, prices, in_stock)
    ]


def expand_vectors(real: np.ndarray, n: int, sigma: float = NOISE_SIGMA, seed: int = 0) -> np.ndarray:
    """n unit vectors: the real ones first, then copies of them (cycling) with gaussian noise, re-normalised."""
    out = np.empty((n, real.shape[1]), np.float32)
    kept = min(n, len(real))
    out[:kept] = real[:kept]
    rng = np.random.default_rng(seed)
    for start in range(kept, n, ADD_CHUNK):  # chunked: the noise for 1M × 384 would be another 1.5 GB
        stop = min(n, start + ADD_CHUNK)
        rows = real[np.arange(start, stop) % len(real)]
        noisy = rows + rng.standard_normal(rows.shape, dtype=np.float32) * np.float32(sigma)
        out[start:stop] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Ground truth and recall


def exact_neighbours(
    vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 100_000, rows: np.ndarray | None = None
) -> np.ndarray:
    """Rows of the k best inner products per query, best first, by brute force in numpy: an answer that owes
    nothing to faiss, so faiss exact is checked too. `rows`: only these rows are candidates (the items a filter
    matches). Chunked so 1M rows never make a [queries, 1M] matrix."""
    candidates = np.arange(len(vectors)) if rows is None else np.asarray(rows, np.int64)
    k = min(k, len(candidates))
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_rows = np.empty((len(queries), 0), np.int64)
    if k == 0:
        return best_rows
    for start in range(0, len(candidates), chunk):
        block = candidates[start : start + chunk]
        # A plain slice when every row is a candidate: no copy of a memory-mapped or 1.5 GB array.
        picked = vectors[start : start + chunk] if rows is None else vectors[block]
        scores = queries @ np.asarray(picked, np.float32).T
        top = min(k, scores.shape[1])
        part = np.argpartition(-scores, top - 1, axis=1)[:, :top]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, 1)], axis=1)
        best_rows = np.concatenate([best_rows, block[part]], axis=1)
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores, best_rows = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_rows, keep, 1)
    return best_rows


def recall_at_k(found: Sequence[Sequence[str]], truth: Sequence[Sequence[str]], k: int = K) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / |truth[:k]| (a catalog smaller than k caps the bar)."""
    if len(found) != len(truth):
        raise ValueError(f"{len(found)} result lists for {len(truth)} queries")
    shares = [len(set(f[:k]) & set(t[:k])) / len(t[:k]) for f, t in zip(found, truth) if len(t[:k])]
    return float(np.mean(shares)) if shares else float("nan")
