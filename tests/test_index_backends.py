"""Vector index backends against brute-force numpy: faiss exact, faiss HNSW and Milvus (one Milvus Lite server on a
loopback port for the module, shared with a second process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from ecomserve.index.faiss_index import FaissIndex
from ecomserve.index.loading import open_index
from ecomserve.index.milvus_index import MilvusIndex
from ecomserve.index.milvus_lite import MilvusLiteServer, start_milvus_lite
from ecomserve.index.vector_index import MissingIds, VectorIndex, VectorIndexError
from ecomserve.spec import FaissSpec, MilvusSpec, SearchSpec

DIM, ITEMS, QUERIES, K = 32, 2_000, 50, 10
HNSW = FaissSpec(exact_below=500)  # 2,000 items: built exact, switched to HNSW while growing


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return (
        [f"sku-{i:05d}" for i in range(ITEMS)],
        unit(rng.standard_normal((ITEMS, DIM))),
        unit(rng.standard_normal((QUERIES, DIM))),
    )


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def milvus(tmp_path_factory) -> Iterator[MilvusLiteServer]:
    with start_milvus_lite(tmp_path_factory.mktemp("milvus") / "catalog.db") as server:
        yield server


BACKENDS = ["faiss-exact", "faiss-hnsw", "milvus"]


@pytest.fixture(params=BACKENDS)
def make_index(request, tmp_path) -> Callable[..., VectorIndex]:
    """Empty indexes of the parametrized backend; every Milvus one in a fresh collection."""

    def make(dim: int = DIM) -> VectorIndex:
        if request.param == "milvus":
            spec = MilvusSpec(uri=request.getfixturevalue("milvus").uri, collection=f"t_{uuid.uuid4().hex}")
            return MilvusIndex(spec, dim)
        return FaissIndex(dim, HNSW if request.param == "faiss-hnsw" else FaissSpec(), tmp_path / "index")

    make.backend = request.param  # type: ignore[attr-defined]
    return make


def filled(make_index, data) -> VectorIndex:
    ids, vectors, _ = data
    index = make_index()
    for start in range(0, ITEMS, 700):  # several upserts, as `ecomserve index build` batches them
        index.upsert(ids[start : start + 700], vectors[start : start + 700])
    return index


def recall(found: list[list[tuple[str, float]]], expected: np.ndarray, ids: list[str]) -> float:
    hits = sum(len({item for item, _ in row} & {ids[i] for i in want}) for row, want in zip(found, expected))
    return hits / expected.size


def test_search_matches_brute_force(make_index, data):
    ids, vectors, queries = data
    index = filled(make_index, data)
    assert len(index) == ITEMS and sorted(index.ids()) == ids
    found = index.search(queries, K)
    expected = brute_force(vectors, queries, K)
    assert all(len(row) == K for row in found)
    for row in found:
        scores = [score for _, score in row]
        assert scores == sorted(scores, reverse=True)
    if make_index.backend == "faiss-hnsw":
        assert index.kind == "hnsw"
        assert recall(found, expected, ids) >= 0.95
    else:
        assert [[item for item, _ in row] for row in found] == [[ids[i] for i in want] for want in expected]
        exact = np.take_along_axis(queries @ vectors.T, expected, axis=1)
        np.testing.assert_allclose([[score for _, score in row] for row in found], exact, atol=1e-5)


def test_upsert_replaces_and_delete_removes(make_index, data):
    ids, vectors, queries = data
    index = filled(make_index, data)
    # Replace: the item's vector becomes the query itself, so it comes first with score 1.
    index.upsert([ids[3], ids[3]], np.stack([vectors[5], queries[0]]))  # a repeated id: the last row wins
    assert len(index) == ITEMS
    first = index.search(queries[:1], K)[0]
    assert first[0][0] == ids[3] and first[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [item for item, _ in first].count(ids[3]) == 1

    # Delete a third of the catalog (faiss: past the compaction threshold) plus ids it never had.
    gone = ids[: ITEMS // 3]
    assert index.delete([*gone, "no-such-sku", "no-such-sku"]) == len(gone)
    assert index.delete(gone[:10]) == 0
    assert len(index) == ITEMS - len(gone)
    assert set(index.ids()) == set(ids[ITEMS // 3 :])
    found = index.search(queries, K)
    assert all(len(row) == K for row in found)
    assert not {item for row in found for item, _ in row} & set(gone)
    expected = brute_force(vectors[ITEMS // 3 :], queries, K)
    assert recall(found, expected, ids[ITEMS // 3 :]) >= (0.95 if make_index.backend == "faiss-hnsw" else 1.0)

    # k beyond the catalog: everything that is left, once.
    index.delete(ids[ITEMS // 3 : -5])
    (row,) = index.search(queries[:1], K)
    assert sorted(item for item, _ in row) == ids[-5:]


def test_vectors_returns_the_stored_rows_by_id(make_index, data):
    """What the `similar` model reads: the stored vectors in the order asked, the latest after a replace, and
    every unknown or deleted id named."""
    ids, vectors, queries = data
    index = filled(make_index, data)
    asked = [ids[9], ids[1500], ids[9], ids[0]]
    np.testing.assert_allclose(index.vectors(asked), vectors[[9, 1500, 9, 0]], atol=1e-6)
    assert index.vectors([]).shape == (0, DIM)
    index.upsert([ids[9]], queries[:1])
    np.testing.assert_allclose(index.vectors([ids[9]]), queries[:1], atol=1e-6)
    index.delete([ids[0]])
    with pytest.raises(MissingIds) as missing:
        index.vectors([ids[1], "no-such-sku", ids[0], "no-such-sku"])
    assert missing.value.missing == ["no-such-sku", ids[0]]


def test_faiss_tombstones_are_skipped_without_compaction(data):
    """Below the compaction threshold deleted rows stay in HNSW; searches fetch past them and still return k."""
    ids, vectors, queries = data
    index = FaissIndex(DIM, HNSW)
    index.upsert(ids, vectors)
    nearest = {ids[i] for i in brute_force(vectors, queries, 3).ravel()}
    assert index.delete(sorted(nearest)) == len(nearest)
    assert len(index._row_ids) == ITEMS  # tombstoned, not rebuilt
    found = index.search(queries, K)
    assert all(len(row) == K for row in found)
    assert not {item for row in found for item, _ in row} & nearest


@pytest.mark.parametrize("spec", [FaissSpec(), HNSW], ids=["exact", "hnsw"])
def test_faiss_save_and_reopen_gives_identical_results(spec, data, tmp_path):
    ids, vectors, queries = data
    search = SearchSpec(faiss=spec)
    index = open_index(search, tmp_path / "index", DIM)
    assert len(index) == 0
    index.upsert(ids, vectors)
    index.delete(ids[:50])  # tombstones survive the round trip
    index.upsert(ids[100:110], vectors[:10])
    index.save(tmp_path / "index")
    index.upsert(ids[:1], vectors[:1])
    index.save(tmp_path / "index")  # a second save keeps only its own folder and the one before
    assert len(list((tmp_path / "index").glob("faiss-*"))) == 2

    reopened = open_index(search, tmp_path / "index", DIM)
    assert isinstance(reopened, FaissIndex) and reopened.kind == index.kind
    assert len(reopened) == len(index) and sorted(reopened.ids()) == sorted(index.ids())
    assert reopened.search(queries, K) == index.search(queries, K)
    assert ids[0] in reopened.ids()  # the second save is the one loaded


def test_faiss_saves_and_reopens_an_empty_index(data, tmp_path):
    ids, vectors, queries = data
    index = FaissIndex(DIM, HNSW)
    index.upsert(ids[:3], vectors[:3])
    index.delete(ids[:3])
    index.save(tmp_path)  # compacted to no rows: a catalog whose items were all deleted
    reopened = FaissIndex.open(tmp_path, DIM, HNSW)
    assert len(reopened) == 0 and reopened.search(queries[:1], K) == [[]]
    assert np.load(next(tmp_path.glob("faiss-*/vectors.npy"))).shape == (0, DIM)


def test_faiss_reopen_rebuilds_when_the_spec_moves(data, tmp_path):
    ids, vectors, queries = data
    exact = FaissIndex(DIM, FaissSpec())
    exact.upsert(ids, vectors)
    exact.save(tmp_path)
    reopened = FaissIndex.open(tmp_path, DIM, HNSW)  # the catalog is now above exact_below
    assert reopened.kind == "hnsw"
    assert recall(reopened.search(queries, K), brute_force(vectors, queries, K), ids) >= 0.95


def test_faiss_concurrent_searches_and_upserts(data):
    """4 searchers and a writer meet at a barrier before each write, so searches run while items are
    added and deleted: without the index's lock they would read a half-updated index."""
    ids, vectors, queries = data
    index = FaissIndex(DIM, HNSW)
    index.upsert(ids[:1000], vectors[:1000])
    writes = range(1000, ITEMS, 100)
    start = threading.Barrier(5)
    writing = threading.Event()
    errors: list[BaseException] = []
    overlapped: list[bool] = []

    def searcher() -> None:
        try:
            for _ in writes:
                start.wait(timeout=60)
                for _ in range(3):
                    overlapped.append(writing.is_set())
                    for row in index.search(queries, K):
                        assert len(row) == K and len({item for item, _ in row}) == K
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for first in writes:
            start.wait(timeout=60)
            writing.set()
            index.upsert(ids[first : first + 100], vectors[first : first + 100])
            index.delete(ids[first - 1000 : first - 950])
            writing.clear()
    except threading.BrokenBarrierError:
        pass  # a searcher failed: its error is reported below
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert any(overlapped), "no search ran while the writer wrote"
    assert len(index) == ITEMS - 500


def test_dim_mismatch_says_what_to_do(make_index, data):
    ids, vectors, queries = data
    index = make_index()
    index.upsert(ids[:10], vectors[:10])
    with pytest.raises(VectorIndexError, match="has dim 32, vectors have 48: rebuild the index for this encoder"):
        index.upsert(ids[:2], np.zeros((2, 48), np.float32))
    with pytest.raises(VectorIndexError, match="has dim 32, queries have 16"):
        index.search(queries[:, :16], K)
    with pytest.raises(VectorIndexError, match=r"vectors must be \[len\(ids\)=3, dim\]"):
        index.upsert(ids[:3], vectors[:2])


def test_reopening_with_another_dim_is_refused(data, milvus, tmp_path):
    ids, vectors, _ = data
    index = FaissIndex(DIM, directory=tmp_path)
    index.upsert(ids[:5], vectors[:5])
    index.save()
    with pytest.raises(VectorIndexError, match="has dim 32, vectors have 384: rebuild the index"):
        open_index(SearchSpec(), tmp_path, 384)
    spec = SearchSpec(backend="milvus", milvus=MilvusSpec(uri=milvus.uri, collection="dim_check"))
    open_index(spec, tmp_path, DIM)
    with pytest.raises(VectorIndexError, match="collection dim_check at .* has dim 32, vectors have 384"):
        open_index(spec, tmp_path, 384)


def test_milvus_refuses_ids_it_cannot_match(milvus):
    index = MilvusIndex(MilvusSpec(uri=milvus.uri, collection="quotes"), DIM)
    with pytest.raises(VectorIndexError, match="single quote"):
        index.upsert(["o'neill-42"], np.ones((1, DIM), np.float32))
    # Double quotes and backslashes are escaped in filters: they round-trip.
    odd = ['12" pan', "a\\b", "ü-ß"]
    index.upsert(odd, unit(np.ones((3, DIM))))
    assert sorted(index.ids()) == sorted(odd)
    assert index.delete(odd) == 3 and len(index) == 0


def test_milvus_unreachable_names_the_uri():
    with pytest.raises(VectorIndexError, match=r"Milvus at http://127\.0\.0\.1:9 is unreachable"):
        MilvusIndex(MilvusSpec(uri="http://127.0.0.1:9"), DIM, timeout_s=1)


SECOND_PROCESS = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from ecomserve.index.milvus_index import MilvusIndex
    from ecomserve.spec import MilvusSpec

    uri, collection, dim = sys.argv[1], sys.argv[2], int(sys.argv[3])
    index = MilvusIndex(MilvusSpec(uri=uri, collection=collection), dim)
    print("ready", len(index), flush=True)
    query = np.zeros((1, dim), np.float32)
    query[0, 0] = 1.0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        hits = index.search(query, 1)[0]
        if hits and hits[0][0] == "from-first":
            break
        time.sleep(0.05)
    else:
        sys.exit("the first process's upsert never became visible")
    index.upsert(["from-second"], np.ones((1, dim), np.float32) / np.sqrt(dim))
    print("seen", hits[0][0], flush=True)
    """
)


def test_milvus_lite_serves_several_processes(milvus, data):
    ids, vectors, _ = data
    spec = MilvusSpec(uri=milvus.uri, collection="shared")
    index = MilvusIndex(spec, DIM)
    index.upsert(ids[:100], vectors[:100])
    child = subprocess.Popen(
        [sys.executable, "-c", SECOND_PROCESS, milvus.uri, spec.collection, str(DIM)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().split() == ["ready", "100"]  # it sees what the first process wrote
        marker = np.zeros((1, DIM), np.float32)
        marker[0, 0] = 1.0
        index.upsert(["from-first"], marker)  # written while the second process is connected
        out, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 0, err
    assert out.split() == ["seen", "from-first"]
    assert len(index) == 102 and "from-second" in index.ids()


def test_milvus_lite_file_is_refused_while_served_elsewhere(tmp_path):
    """A second start on the same file fails with the reason instead of corrupting it."""
    with start_milvus_lite(tmp_path / "one.db") as server:
        assert server.running
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from ecomserve.index.milvus_lite import start_milvus_lite;"
                "start_milvus_lite(Path(sys.argv[1]))",
                str(tmp_path / "one.db"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert child.returncode != 0 and "already open in another process" in child.stderr
    assert not server.running


def test_open_index_with_a_lite_file_uses_the_server_this_process_runs(milvus, data, tmp_path):
    ids, vectors, _ = data
    spec = SearchSpec(backend="milvus", milvus=MilvusSpec(uri=str(milvus.db_file), collection="by_path"))
    index = open_index(spec, tmp_path, DIM)
    assert isinstance(index, MilvusIndex) and index.uri == milvus.uri
    index.upsert(ids[:3], vectors[:3])
    assert len(index) == 3


def test_relative_lite_file_is_taken_from_the_index_folders_parent(tmp_path: Path):
    from ecomserve.index.milvus_index import _resolve_uri

    assert _resolve_uri("catalog.db", tmp_path) == str(tmp_path.resolve() / "catalog.db")
    assert _resolve_uri("http://milvus:19530", tmp_path) == "http://milvus:19530"
