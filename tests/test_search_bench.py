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
    exact_neighbours,
    expand_vectors,
    item_ids,
    recall_at_k,
    shipped_titles,
    synthetic_titles,
)
from ecomserve.bench.search import SearchBenchOptions, run_search_bench
from ecomserve.bench.vector_cache import Embedder, cached_vectors

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
    rows = {row["config"]: row for row in results["rows"]}
    assert set(rows) == {"faiss flat", "milvus lite"} | {f"faiss hnsw ef={ef}" for ef in search.EF_SWEEP}
    assert rows["faiss flat"]["recall_at_10"] == 1.0
    assert rows["milvus lite"]["recall_at_10"] == 1.0  # Milvus Lite searches exactly
    assert all(rows[f"faiss hnsw ef={ef}"]["recall_at_10"] >= 0.9 for ef in search.EF_SWEEP)
    assert all(row["requests"] > 0 and row["errors"] == 0 for row in rows.values())
    saved = json.loads((tmp_path / "search_results.json").read_text())
    assert [(s["scale"], s["dim"], s["vectors"]) for s in saved["scales"]] == [(1500, DIM, "embedded")]
    with (tmp_path / "search.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    assert (tmp_path / "search_recall_qps.png").read_bytes()[:4] == b"\x89PNG"
    assert "faiss hnsw ef=128" in (tmp_path / "search_summary.md").read_text()


def test_cli_runs_the_search_workload(tmp_path, monkeypatch):
    monkeypatch.setattr(search, "bench_embedder", lambda *_args: Embedder(RandomEmbedder(), "fake"))
    monkeypatch.setattr(search, "EF_SWEEP", (64,))
    cli.run(["bench", "--workload", "search", "--scales", "300", "--duration", "0.1", "--out", str(tmp_path)])
    configs = [row["config"] for row in json.loads((tmp_path / "search_results.json").read_text())["rows"]]
    assert configs[0] == "faiss flat" and "milvus lite" in configs


def test_cli_refuses_scales_beyond_a_million(tmp_path):
    with pytest.raises(Exception, match="scale"):
        cli.run(["bench", "--workload", "search", "--scales", "2000000", "--out", str(tmp_path)])
