"""`ecomserve bench --workload search` without a model: the catalog generator, recall, the vector cache, and a
tiny end-to-end run on random unit vectors standing in for the embeddings."""

from __future__ import annotations

import csv
import json
import zlib

import numpy as np
import pytest

from ecomserve import cli
from ecomserve.bench import search
from ecomserve.bench.catalogs import (
    BENCH_FILTERS,
    BRANDS,
    CATEGORIES,
    catalog_titles,
    exact_neighbours,
    expand_vectors,
    item_fields,
    item_ids,
    recall_at_k,
    shipped_queries,
    shipped_titles,
    synthetic_titles,
)
from ecomserve.bench.search import SearchBenchOptions, run_search_bench
from ecomserve.bench.search_queries import answer_quality, filter_cases
from ecomserve.bench.vector_cache import Embedder, cached_vectors
from ecomserve.index.faiss_index import FaissIndex
from ecomserve.index.filters import parse_filter
from ecomserve.spec import FaissSpec

DIM = 32


class RandomEmbedder:
    """A random unit vector per text, the same for the same text in any batch; counts the texts it embeds."""

    def __init__(self) -> None:
        self.embedded = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.embedded += len(texts)
        rows = np.stack(
            [np.random.default_rng(zlib.crc32(t.encode())).standard_normal(DIM, dtype=np.float32) for t in texts]
        )
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_generator_is_deterministic_distinct_and_prefix_stable():
    base = shipped_titles()
    titles = synthetic_titles(base, 3000, seed=0)
    assert titles == synthetic_titles(base, 3000, seed=0)
    assert len(set(titles)) == 3000
    assert not set(titles) & set(base)  # every title gained a brand at least
    assert synthetic_titles(base, 700, seed=0) == titles[:700]  # smaller scales reuse larger scales' vectors
    assert synthetic_titles(base, 3000, seed=1) != titles
    ids = item_ids(3000)
    assert len(set(ids)) == 3000 and ids[:2] == ["sku-0", "sku-1"]


def test_recall_on_a_hand_made_case():
    truth = [["a", "b", "c"], ["d", "e", "f"]]
    assert recall_at_k(truth, truth, 3) == 1.0
    assert recall_at_k([["c", "x", "a"], ["y", "z", "w"]], truth, 3) == pytest.approx((2 / 3 + 0) / 2)
    assert recall_at_k([["a", "b", "x"], ["d", "e", "f"]], truth, 2) == 1.0  # only the first k of each count
    assert recall_at_k([["a"]], [["a"]], 10) == 1.0  # a catalog smaller than k


def test_exact_neighbours_across_chunks():
    vectors = np.array([[1, 0], [0, 1], [0.8, 0.6], [-1, 0], [0.6, 0.8]], np.float32)
    queries = np.array([[1, 0], [0, 1]], np.float32)
    expected = [[0, 2, 4], [1, 4, 2]]
    assert exact_neighbours(vectors, queries, 3).tolist() == expected
    assert exact_neighbours(vectors, queries, 3, chunk=2).tolist() == expected


def test_exact_neighbours_among_given_rows_only():
    vectors = np.array([[1, 0], [0, 1], [0.8, 0.6], [-1, 0], [0.6, 0.8]], np.float32)
    queries = np.array([[1, 0], [0, 1]], np.float32)
    rows = np.array([1, 3, 4])
    assert exact_neighbours(vectors, queries, 2, rows=rows).tolist() == [[4, 1], [1, 4]]
    assert exact_neighbours(vectors, queries, 2, chunk=1, rows=rows).tolist() == [[4, 1], [1, 4]]
    assert exact_neighbours(vectors, queries, 10, rows=rows).shape == (2, 3)  # fewer matching than k
    assert exact_neighbours(vectors, queries, 10, rows=np.array([], np.int64)).shape == (2, 0)


def test_item_fields_are_deterministic_and_the_filters_hit_their_selectivity():
    titles = synthetic_titles(shipped_titles(), 20_000)
    fields = item_fields(titles)
    assert fields == item_fields(titles) and fields != item_fields(titles, seed=1)
    assert all(title.startswith(f["brand"] + " ") for title, f in zip(titles, fields))
    assert {f["category"] for f in fields} == set(CATEGORIES) and {f["brand"] for f in fields} == set(BRANDS)
    # Plain JSON kinds, as a parsed catalog has them: the filter compares kinds.
    assert {(type(f["price"]), type(f["in_stock"])) for f in fields} == {(float, bool)}
    for label, wanted in BENCH_FILTERS.items():
        where = parse_filter(wanted)
        share = np.mean([where.matches(f) for f in fields])
        assert share == pytest.approx(float(label.rstrip("%")) / 100, rel=0.15), label
    # The 1 % filter, counted without the filter language.
    one = sum(f["category"] == CATEGORIES[0] and f["price"] < 100 for f in fields)
    assert one == sum(parse_filter(BENCH_FILTERS["1%"]).matches(f) for f in fields)
    # Beyond the embedded titles, a row takes the title (and so the brand) of the row its vector copies.
    assert catalog_titles(titles[:3], 7) == [titles[row % 3] for row in range(7)]


def test_the_answer_check_counts_short_answers_and_items_outside_the_filter():
    """A real faiss index given other fields than the truth: its answers fail the check, and the check says so."""
    titles = synthetic_titles(shipped_titles(), 400)
    ids, vectors, fields = item_ids(400), RandomEmbedder()(titles), item_fields(titles)
    queries = RandomEmbedder()(shipped_queries()[:20])
    _, ten, half = filter_cases(ids, fields, vectors, queries)
    index = FaissIndex(DIM, FaissSpec())
    index.upsert(ids, vectors, fields)
    assert answer_quality(index, queries, half) == {"recall_at_10": 1.0, "short_results": 0, "filter_violations": 0}
    in_stock = [dict(f, in_stock=True) for f in fields]  # the index now believes every item is in stock
    index.upsert(ids, vectors, in_stock)
    wrong = answer_quality(index, queries, half)
    assert wrong["filter_violations"] > 0 and wrong["recall_at_10"] < 1.0
    index.upsert(ids, vectors, [dict(f, category="none") for f in fields])  # the 10 % filter's category is gone
    assert ten.matching.sum() >= 10 and answer_quality(index, queries, ten)["short_results"] == len(queries)


def test_synthetic_vectors_keep_the_real_ones_and_stay_near_them():
    real = RandomEmbedder()([f"t{i}" for i in range(50)])
    grown = expand_vectors(real, 180, sigma=0.01, seed=0)
    assert grown.shape == (180, DIM) and grown.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(grown, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(grown[:50], real)
    cosines = (grown[50:] * real[np.arange(50, 180) % 50]).sum(axis=1)
    assert cosines.min() > 0.95 and cosines.max() < 1.0
    np.testing.assert_array_equal(grown, expand_vectors(real, 180, sigma=0.01, seed=0))


def test_cache_embeds_only_what_no_cached_scale_has(tmp_path):
    fake = RandomEmbedder()
    embedder = Embedder(fake, "fake")
    titles = synthetic_titles(shipped_titles(), 500)
    first = cached_vectors(titles[:300], embedder, tmp_path, "k")
    assert fake.embedded == 300
    grown = cached_vectors(titles, embedder, tmp_path, "k")
    assert fake.embedded == 500  # the 300 cached rows were reused
    again = cached_vectors(titles[:400], embedder, tmp_path, "k")
    assert fake.embedded == 500
    np.testing.assert_array_equal(grown[:300], first)
    np.testing.assert_array_equal(again, fake(titles[:400]))
    assert cached_vectors(titles[:300], embedder, tmp_path, "other").shape == (300, DIM)  # other key, no reuse


def test_tiny_run_writes_every_output(tmp_path):
    options = SearchBenchOptions(out_dir=tmp_path, scales=[1500], duration_s=0.3)
    results = run_search_bench(options, Embedder(RandomEmbedder(), "fake"))
    rows = {(row["config"], row["filter_target"]): row for row in results["rows"]}
    assert len(rows) == len(results["rows"])  # one row per config and filter
    served = f"faiss hnsw ef={options.faiss.ef_search}"
    dense = {"faiss flat", "milvus lite"} | {f"faiss hnsw ef={ef}" for ef in search.EF_SWEEP}
    filtered = {"faiss flat", served, "milvus lite"}
    assert set(rows) == (
        {(config, None) for config in dense}
        | {(config, label) for config in filtered for label in BENCH_FILTERS}
        | {("bm25", None), (f"bm25 + faiss flat ({options.fusion.mode})", None)}  # 1500 items: flat is served
    )
    assert rows[("faiss flat", None)]["recall_at_10"] == 1.0
    assert rows[("milvus lite", None)]["recall_at_10"] == 1.0  # Milvus Lite searches exactly
    assert all(rows[(f"faiss hnsw ef={ef}", None)]["recall_at_10"] >= 0.9 for ef in search.EF_SWEEP)
    assert all(row["requests"] > 0 and row["errors"] == 0 for row in rows.values())
    saved = json.loads((tmp_path / "search_results.json").read_text())
    assert [(s["scale"], s["dim"], s["vectors"]) for s in saved["scales"]] == [(1500, DIM, "embedded")]
    with (tmp_path / "search.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    assert (tmp_path / "search_recall_qps.png").read_bytes()[:4] == b"\x89PNG"
    summary = (tmp_path / "search_summary.md").read_text()
    assert "faiss hnsw ef=128" in summary and "bm25 + faiss flat" in summary


def test_tiny_run_filters_inside_the_index_and_checks_every_answer(tmp_path):
    options = SearchBenchOptions(out_dir=tmp_path, scales=[3000], duration_s=0.1, ef_search=[64], milvus=False)
    results = run_search_bench(options, Embedder(RandomEmbedder(), "fake"))
    rows = results["rows"]
    # The shares each row reports are the catalog's, counted here without the bench.
    titles = catalog_titles(synthetic_titles(shipped_titles(), 3000), 3000)
    fields = item_fields(titles)
    expected = {label: np.mean([parse_filter(f).matches(i) for i in fields]) for label, f in BENCH_FILTERS.items()}
    assert results["scales"][0]["filter_shares"] == pytest.approx(expected)
    filtered = [row for row in rows if row["filter"] is not None]
    assert len(filtered) == 2 * len(BENCH_FILTERS)  # faiss flat and HNSW at the spec's efSearch
    for row in filtered:
        assert row["filter_share"] == pytest.approx(expected[row["filter_target"]])
        assert json.loads(row["filter"]) == BENCH_FILTERS[row["filter_target"]]
        # Every query got min(10, matching) results, each of them matching its filter.
        assert row["short_results"] == 0 and row["filter_violations"] == 0
        assert row["requests"] > 0 and row["errors"] == 0
    assert all(row["recall_at_10"] == 1.0 for row in filtered if row["config"] == "faiss flat")
    assert all(row["recall_at_10"] >= 0.9 for row in filtered)
    (hybrid,) = [row for row in rows if row["mode"] == "hybrid"]
    (lexical,) = [row for row in rows if row["mode"] == "lexical"]
    assert hybrid["requests"] > 0 and hybrid["errors"] == 0 and lexical["requests"] > 0 and lexical["errors"] == 0
    # The BM25 build: its row and the scale's record, with its index on disk.
    assert lexical["build_s"] is not None and lexical["disk_mb"] > 0 and lexical["rss_growth_mb"] is not None
    assert results["scales"][0]["bm25"]["disk_mb"] == lexical["disk_mb"]


def test_cli_runs_the_search_workload(tmp_path, monkeypatch):
    monkeypatch.setattr(search, "bench_embedder", lambda *_args: Embedder(RandomEmbedder(), "fake"))
    monkeypatch.setattr(search, "EF_SWEEP", (64,))
    cli.run(["bench", "--workload", "search", "--scales", "300", "--duration", "0.1", "--out", str(tmp_path)])
    configs = [row["config"] for row in json.loads((tmp_path / "search_results.json").read_text())["rows"]]
    assert configs[0] == "faiss flat" and {"milvus lite", "bm25"} <= set(configs)


def test_cli_refuses_scales_beyond_a_million(tmp_path):
    with pytest.raises(Exception, match="scale"):
        cli.run(["bench", "--workload", "search", "--scales", "2000000", "--out", str(tmp_path)])
