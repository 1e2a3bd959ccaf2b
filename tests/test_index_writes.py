"""Catalog index writes under hostile conditions, on real processes and files: a writer SIGKILLed while
it stages a version or checkpoints a build, an upsert during a build, a write that runs out of room
(RLIMIT_FSIZE: the real EFBIG a file-size limit gives), readers during writes, and the Milvus backend
going through the same staging and lock."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from rich.console import Console
from support import make_tiny_bert, spec_from, wait_for

from ecomserve.index.catalog import CatalogItem, Manifest, read_manifest, read_titles, write_manifest, write_titles
from ecomserve.index.faiss_index import FaissIndex
from ecomserve.index.loading import load_index
from ecomserve.index.ops import build_index, delete_items, upsert_items
from ecomserve.paths import corpus_lines
from ecomserve.repository.builder import build_repository
from ecomserve.repository.inprocess import release_embedder
from ecomserve.spec import FaissSpec, MilvusSpec

DIM = 32  # make_tiny_bert's hidden size
EXACT = FaissSpec(exact_below=10**9)  # large synthetic indexes stay flat: no HNSW build in the tests


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny random encoder's repository (release 1); no server: the writers embed in-process."""
    root = tmp_path_factory.mktemp("index_writes")
    source = make_tiny_bert(root / "tiny", seed=11)
    spec = spec_from(
        {
            "encoders": [{"name": "tiny", "source": str(source), "max_seq_len": 32}],
            "search": {"faiss": EXACT.model_dump()},
        }
    )
    repository = root / "model_repository"
    build_repository(spec, repository, console=Console(quiet=True))
    return spec, repository


@pytest.fixture
def index(project, tmp_path):
    """This test's index folder, and a spec file naming it for the `ecomserve index` commands."""
    spec, repository = project
    target = tmp_path / "catalog_index"
    spec = spec.model_copy(update={"search": spec.search.model_copy(update={"index_dir": str(target)})})
    spec_path = tmp_path / "pipeline.yaml"
    spec_path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return SimpleNamespace(spec=spec, repository=repository, target=target, spec_path=spec_path, tmp=tmp_path)


def catalog_items(count: int = 800, prefix: str = "sku") -> list[CatalogItem]:
    titles = corpus_lines("titles.txt")
    return [CatalogItem(f"{prefix}-{i}", f"{titles[i % len(titles)]} {i // len(titles)}") for i in range(count)]


def write_catalog(path: Path, items: list[CatalogItem]) -> Path:
    path.write_text("".join(json.dumps({"id": item.id, "title": item.title}) + "\n" for item in items))
    return path


def index_command(index, *args: str, wait: float = 0, **popen) -> subprocess.Popen:
    """`ecomserve index ...` in its own process; errors on one line (wide COLUMNS: rich wraps at 80)."""
    command = [sys.executable, "-m", "ecomserve", "index", *args]
    command += ["--spec", str(index.spec_path), "--repository", str(index.repository), "--wait", str(wait)]
    env = {**os.environ, "COLUMNS": "1000"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def kill_when(process: subprocess.Popen, condition, timeout_s: float = 120) -> None:
    """SIGKILL `process` as soon as `condition()` holds (polled every 2 ms)."""

    def reached() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the writer finished before it could be killed: {process.communicate()[1][-2000:]}")
        return condition()

    assert wait_for(reached, timeout_s, interval_s=0.002), "the writer never reached the point to kill it at"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def seed_large_index(target: Path, count: int) -> Manifest:
    """A live version of `count` random items written straight into the index layout: embedding that many
    titles would take minutes, and what matters is how long the next write takes to stage all of them."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((count, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"seed-{i}" for i in range(count)]
    faiss_index = FaissIndex(DIM, EXACT)
    faiss_index.upsert(ids, vectors)
    manifest = Manifest("faiss", release=1, dim=DIM, version=1, items=count, data="v1-00000000")
    folder = target / manifest.data
    folder.mkdir(parents=True)
    faiss_index.save(folder)
    write_titles(folder, {item: f"synthetic catalog item number {item}" for item in ids})
    write_manifest(target, manifest)
    return manifest


def top_id(index, title: str) -> str:
    """The best match for `title` in the live index, as `search` would load it."""
    _, vectors, titles = load_index(index.spec.search, index.target)
    query = release_embedder(index.repository, 1, index.spec)([title])
    return next(item for item, _ in vectors.search(query, 5)[0] if item in titles)


def test_an_upsert_killed_while_staging_leaves_the_old_version_live(index):
    live = seed_large_index(index.target, 400_000)  # ~170 MB to stage: the write takes long enough to hit
    before = snapshot(index.target)
    new = CatalogItem("sku-new", "zebra print velvet armchair")
    writer = index_command(index, "upsert", str(write_catalog(index.tmp / "new.jsonl", [new])))
    kill_when(writer, lambda: any(index.target.glob(".v2-*.staging")))

    assert list(index.target.glob(".v2-*.staging")), "killed after its commit: the test needs a larger index"
    assert read_manifest(index.target) == live
    assert {name: digest for name, digest in snapshot(index.target).items() if not name.startswith(".")} == before
    manifest, vectors, titles = load_index(index.spec.search, index.target)
    assert manifest == live and len(vectors) == len(titles) == live.items and new.id not in titles

    # The killed writer's lock died with it: the next writer starts at once and clears what it left.
    updated = upsert_items(index.spec, index.repository, [new], index.target, Console(quiet=True), wait_s=0)
    assert updated.version == 2 and updated.items == live.items + 1
    assert not list(index.target.glob(".*staging")) and new.id in read_titles(index.target)


def test_a_killed_build_keeps_the_live_index_and_resumes(index):
    live = build_index(index.spec, index.repository, catalog_items(800), index.target, Console(quiet=True))
    items = catalog_items(12_000)  # 47 batches: checkpoints after 20 and 40
    staging = index.target.with_name(index.target.name + ".building")
    builder = index_command(index, "build", str(write_catalog(index.tmp / "catalog.jsonl", items)))
    kill_when(builder, lambda: read_manifest(staging) is not None)

    assert read_manifest(index.target) == live
    console = Console(record=True, width=200)
    manifest = build_index(index.spec, index.repository, items, index.target, console, wait_s=0)
    resumed = console.export_text()
    assert "already embedded" in resumed and f"{len(items)} items already" not in resumed, resumed
    assert manifest.version == live.version + 1 and manifest.items == len(items)
    assert set(read_titles(index.target)) == {item.id for item in items} and not staging.exists()


def test_an_upsert_during_a_build_is_refused_or_waits_and_is_never_lost(index):
    live = build_index(index.spec, index.repository, catalog_items(800), index.target, Console(quiet=True))
    new = CatalogItem("sku-new", "zebra print velvet armchair")
    feed = write_catalog(index.tmp / "new.jsonl", [new])
    builder = index_command(index, "build", str(write_catalog(index.tmp / "catalog.jsonl", catalog_items(60_000))))
    lock = index.target.with_name(index.target.name + ".lock")
    assert wait_for(lambda: "index build" in lock.read_text() or builder.poll() is not None, timeout_s=60)
    assert builder.poll() is None, "the build ended before the upsert could meet it"

    refused = index_command(index, "upsert", str(feed), wait=0)
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert f"`ecomserve index build` (pid {builder.pid}" in err and "--wait" in err, err

    waiting = index_command(index, "upsert", str(feed), wait=300)
    assert builder.wait(timeout=300) == 0, builder.communicate()[1][-2000:]
    _, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err
    assert read_manifest(index.target).version == live.version + 2  # the build's version, then the upsert's
    assert new.id in read_titles(index.target) and top_id(index, new.title) == new.id


def limit_file_size() -> None:
    """In the writer's process: files may grow to 64 KiB, then write() fails with EFBIG (SIGXFSZ ignored)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_running_out_of_room_is_one_line_and_leaves_the_live_index(index):
    live = build_index(index.spec, index.repository, catalog_items(2_000), index.target, Console(quiet=True))
    before = snapshot(index.target)  # the vectors alone are 250 KiB
    feed = write_catalog(index.tmp / "new.jsonl", [CatalogItem("sku-new", "zebra print velvet armchair")])
    writer = index_command(index, "upsert", str(feed), preexec_fn=limit_file_size)
    _, err = writer.communicate(timeout=120)

    last = err.strip().splitlines()[-1]  # after the progress bar of the embedding
    assert writer.returncode == 1 and "Traceback" not in err and err.count("error:") == 1, err
    assert last.startswith("error: no room to write") and "(File too large)" in last, err
    assert last.endswith("the index in use is unchanged")
    assert read_manifest(index.target) == live and snapshot(index.target) == before  # nothing staged is left
    upsert_items(index.spec, index.repository, [CatalogItem("sku-new", "zebra")], index.target, Console(quiet=True))
    assert read_manifest(index.target).version == live.version + 1


def test_readers_see_whole_versions_while_writers_commit(index):
    build_index(index.spec, index.repository, catalog_items(800), index.target, Console(quiet=True))
    seen, failures, stop = [], [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                manifest, vectors, titles = load_index(index.spec.search, index.target)
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(repr(exc))
                return
            seen.append((manifest.version, manifest.items, len(vectors), sorted(titles) == sorted(vectors.ids())))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for round_ in range(12):
            added = catalog_items(50, prefix=f"round{round_}")
            upsert_items(index.spec, index.repository, added, index.target, Console(quiet=True))
            delete_items(index.spec, [added[0].id], index.target)
    finally:
        stop.set()
        reader.join(timeout=60)
    assert failures == []
    assert len({version for version, *_ in seen}) > 3, "the reader never overlapped the writes"
    assert all(items == count and same for _, items, count, same in seen)
    assert len(list(index.target.glob("v*"))) == 2  # the live version and the one before


def test_milvus_writes_go_through_the_same_staging_and_lock(index, tmp_path):
    from ecomserve.index.filters import parse_filter
    from ecomserve.index.loading import load_search_index
    from ecomserve.index.milvus_index import MilvusIndex, MilvusLexical
    from ecomserve.index.milvus_lite import start_milvus_lite

    with start_milvus_lite(tmp_path / "catalog.db") as milvus:
        search = index.spec.search.model_copy(update={"backend": "milvus", "milvus": MilvusSpec(uri=milvus.uri)})
        spec = index.spec.model_copy(update={"search": search})
        milvus_index = SimpleNamespace(**{**vars(index), "spec": spec})
        items = catalog_items(600)
        build_index(spec, index.repository, items, index.target, Console(quiet=True))
        new = CatalogItem("sku-new", "zebra print velvet armchair")
        upsert_items(spec, index.repository, [new], index.target, Console(quiet=True))
        manifest, removed = delete_items(spec, [items[0].id, "unknown"], index.target)
        assert removed == 1 and manifest.version == 3 and manifest.items == len(items)
        assert top_id(milvus_index, new.title) == new.id
        (version,) = [path for path in index.target.iterdir() if path.name == manifest.data]
        # The vectors, the filterable fields and the BM25 tokens live in Milvus; titles and the items' other
        # fields here (no bm25s files: Milvus's own BM25 answers lexical search).
        assert sorted(path.name for path in version.iterdir()) == ["items.json", "titles.json"]
        _, _, _, lexical = load_search_index(spec.search, index.target)
        assert isinstance(lexical, MilvusLexical)
        assert lexical.search("zebra velvet armchair", 3)[0][0] == new.id
        assert lexical.search("zebra velvet", 3, parse_filter({"brand": "Nobody"})) == []
        assert items[0].id not in {item for item, _ in lexical.search(items[0].title, 50)}  # deleted
        # A build of fewer items for the same release also clears the collection of the ones it drops.
        rebuilt = build_index(spec, index.repository, items[:100], index.target, Console(quiet=True))
        collection = MilvusIndex(spec.search.milvus.model_copy(update={"collection": "ecomserve_catalog_r1"}), DIM)
        assert rebuilt.items == len(collection) == 100


def test_a_catalog_with_a_bad_row_writes_nothing_and_a_good_one_commits_its_fields(index):
    from ecomserve.index.catalog import read_items
    from ecomserve.index.filters import parse_filter

    build_index(index.spec, index.repository, catalog_items(20), index.target, Console(quiet=True))
    before = snapshot(index.target)
    good = '{"id": "new-1", "title": "zebra print velvet armchair", "brand": "Acme", "price": 10, "text": "soft"}\n'
    feed = index.tmp / "feed.jsonl"
    feed.write_text(good + '{"id": "new-2", "title": "desk lamp", "price": "ten"}\n')
    refused = index_command(index, "upsert", str(feed))
    _, errors = refused.communicate(timeout=300)
    assert refused.returncode != 0 and "feed.jsonl:2: 'price' must be a number" in errors, errors
    assert snapshot(index.target) == before  # nothing embedded, staged or committed
    feed.write_text(good)
    accepted = index_command(index, "upsert", str(feed))
    _, errors = accepted.communicate(timeout=300)
    assert accepted.returncode == 0, errors
    assert read_items(index.target)["new-1"] == {"text": "soft", "brand": "Acme", "price": 10}
    _, vectors, _ = load_index(index.spec.search, index.target)
    query = release_embedder(index.repository, 1, index.spec)(["armchair"])
    assert [item for item, _ in vectors.search(query, 5, parse_filter({"brand": "Acme"}))[0]] == ["new-1"]


def test_every_commit_carries_the_bm25_index_of_its_own_items(index):
    """Build, upsert and delete each commit a BM25 index (over title, brand, text, attribute values) into the
    version folder their manifest names, so `search` reads lexical and dense data of one version."""
    from ecomserve.index.catalog import read_manifest, version_dir
    from ecomserve.index.lexical import LEXICAL
    from ecomserve.index.loading import load_search_index

    def lexical_ids(query: str) -> list[str]:
        manifest, vectors, titles, lexical = load_search_index(index.spec.search, index.target)
        assert sorted(lexical.ids) == sorted(titles) == sorted(vectors.ids())
        assert (version_dir(index.target, manifest) / LEXICAL).is_dir()
        return [item for item, _ in lexical.search(query, 5)]

    build_index(index.spec, index.repository, catalog_items(20), index.target, Console(quiet=True))
    assert lexical_ids("WH-1000XM4") == []
    twins = [
        CatalogItem("xm4", "Sony WH-1000XM4 wireless headphones", brand="Sony"),
        CatalogItem("xm5", "Sony WH-1000XM5 wireless headphones", brand="Sony", attributes={"color": "zebrastripe"}),
    ]
    upsert_items(index.spec, index.repository, twins, index.target, Console(quiet=True))
    assert lexical_ids("WH-1000XM4")[0] == "xm4" and lexical_ids("wh1000xm5") == ["xm5"]
    assert lexical_ids("zebrastripe") == ["xm5"]  # attribute values are indexed
    delete_items(index.spec, ["xm4"], index.target)
    assert "xm4" not in lexical_ids("WH-1000XM4") and read_manifest(index.target).items == 21
