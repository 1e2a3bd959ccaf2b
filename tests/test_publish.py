"""Live updates on a real tritonserver: publish and rollback under traffic, protected model control,
the response cache across releases, refused releases, and recovery from a killed python stub.

The server serves a tiny random BERT; the release published over it is another tiny BERT (another
seed), so which release answered is visible in every embedding."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from rich.console import Console
from support import TorchReference, client_for, embed_cache_counts, make_tiny_bert, spec_from, wait_for
from tritonclient.utils import InferenceServerException

from ecomserve.contract import ADMIN_HEADER
from ecomserve.errors import EcomserveError, RepositoryError
from ecomserve.index.catalog import CatalogItem
from ecomserve.index.loading import MANIFEST_CHECK_S
from ecomserve.index.ops import build_index, index_dir
from ecomserve.paths import corpus_lines
from ecomserve.publish import publish, rollback
from ecomserve.repository.builder import build_repository
from ecomserve.repository.configs import HEAD_INSTANCES
from ecomserve.repository.inprocess import release_embedder
from ecomserve.repository.releases import live_release, releases
from ecomserve.server.control import ModelControl
from ecomserve.server.process import Ports, ServerOptions, TritonServer, free_port

pytestmark = pytest.mark.integration

ADMIN_KEY = "test-admin-key"
TEXTS = ["red running shoes", "stainless steel water bottle", "wireless headphones"]
CANDIDATES = ["trail runner", "teapot", "usb cable", "kids headphones"]


def tiny_spec(source: Path, max_ndcg_drop: float = 1.0, **encoder):
    """Random tiny models rank the eval set at random, so the quality gate is opened unless a test shuts it."""
    return spec_from(
        {
            "encoders": [{"name": "tiny", "source": str(source), "max_seq_len": 32, **encoder}],
            "serving": {"instances": 1, "max_ndcg_drop": max_ndcg_drop},
            "search": {"max_top_k": 20},
        }
    )


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("releases")
    return {"old": make_tiny_bert(root / "old", seed=11), "new": make_tiny_bert(root / "new", seed=12)}


@pytest.fixture(scope="module")
def references(sources) -> dict[str, np.ndarray]:
    return {name: TorchReference(str(path), max_seq_len=32).embed(TEXTS) for name, path in sources.items()}


@pytest.fixture(scope="module")
def live(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    repository = root / "model_repository"
    build_repository(tiny_spec(sources["old"]), repository)
    ports = Ports(http=free_port(), grpc=free_port(), metrics=free_port(), api=free_port())
    server = TritonServer(
        ServerOptions(repository=repository, ports=ports, work_dir=root / "work", admin_key=ADMIN_KEY)
    )
    server.start(timeout_s=240)
    yield server
    server.stop()


@pytest.fixture
def control(live, sources):
    """Model control for a test that may publish or roll back. Every test starts with the live release
    serving the "old" weights, whatever ran before it: a test that leaves the "new" weights live (one
    that failed half-way) is rolled back to the release that was live before it."""
    repository = live.options.repository
    before = live_release(repository)
    control = ModelControl(live.http_url, ADMIN_KEY)
    yield control
    try:
        probe = [f"which release is live {uuid.uuid4().hex}"]  # never sent before: not from the cache
        with client_for(live, "grpc") as client:
            served = client.embed(probe)
        if not np.allclose(served, references_for(sources, "old", probe), atol=1e-4):
            rollback(repository, control, to=before)
    finally:
        control.close()


def which_release(vectors: np.ndarray, references: dict[str, np.ndarray]) -> str:
    matches = [name for name, ref in references.items() if np.allclose(vectors, ref, atol=1e-4)]
    assert len(matches) == 1, "an answer matched neither release (or both)"
    return matches[0]


class Traffic:
    """4 threads of embed and rank (both protocols) until stopped; every failure and every answer kept.

    Each embed answer is kept as (phase when sent, phase when received, release that answered), where
    `phase` is a step the test sets between its actions: which release must answer is a condition on
    what happened before the request left and after it came back, not on the clock."""

    def __init__(self, server, references):
        self.server, self.references = server, references
        self.failures: list[str] = []
        self.answers: list[tuple[int, int, str]] = []
        self.phase = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(4)]

    def _run(self, index: int) -> None:
        with client_for(self.server, ("http", "grpc")[index % 2]) as client:
            while not self._stop.is_set():
                try:
                    if index < 2:
                        sent = self.phase
                        vectors = client.embed(TEXTS)
                        self.answers.append((sent, self.phase, which_release(vectors, self.references)))
                    else:
                        assert len(client.rank(TEXTS[0], CANDIDATES).scores) == len(CANDIDATES)
                except Exception as exc:  # noqa: BLE001 - every kind of failure counts
                    self.failures.append(repr(exc))

    def answered_within(self, phase: int) -> list[str]:
        """The releases that answered requests sent and received while the test was in `phase`."""
        return [name for sent, received, name in self.answers if sent == received == phase]

    def wait_for_answers(self, phase: int, count: int = 10, timeout_s: float = 60) -> None:
        assert wait_for(lambda: len(self.answered_within(phase)) >= count or self.failures, timeout_s), (
            f"fewer than {count} answers in phase {phase} within {timeout_s} s: {self.answers[-5:]}"
        )

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        self.wait_for_answers(0)
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in self._threads), "a traffic thread is stuck"


def test_publish_and_rollback_under_traffic(live, control, sources, references):
    repository = live.options.repository
    before, newest = live_release(repository), releases(repository)[-1]
    with client_for(live, "http") as client:
        assert which_release(client.embed(TEXTS), references) == "old"  # now in the response cache too
    with Traffic(live, references) as traffic:  # phase 0: the old release answers
        traffic.phase = 1  # publishing: either release may answer
        released = publish(tiny_spec(sources["new"]), None, repository, control, Console(stderr=True))
        traffic.phase = 2  # published: what is sent from now on must be answered by the new release
        traffic.wait_for_answers(2)
        traffic.phase = 3  # rolling back: either release may answer
        _, back_to = rollback(repository, control, to=before)
        traffic.phase = 4  # rolled back: the old release answers again
        traffic.wait_for_answers(4)
    assert traffic.failures == []
    assert (released, back_to) == (newest + 1, before) and releases(repository)[-1] == released
    assert live_release(repository) == before
    # answers switch once and never mix: "old" before the publish, "new" after it until the rollback,
    # "old" after the rollback
    for phase, release in ((0, "old"), (2, "new"), (4, "old")):
        assert set(traffic.answered_within(phase)) == {release}, phase


def test_rollback_past_the_loaded_releases_keeps_answering(live, control, sources, references):
    """Two publishes push the old release out of the loaded window (serving.versions_loaded: 2); rolling
    back to it must load it before `embed` moves (moving first left `embed` with no version: 404s)."""
    repository = live.options.repository
    before = live_release(repository)
    for _ in range(2):
        publish(tiny_spec(sources["new"]), None, repository, control, Console(stderr=True))
    with Traffic(live, references) as traffic:  # phase 0: the new release answers
        traffic.phase = 1  # rolling back: either release may answer
        rollback(repository, control, to=before)
        traffic.phase = 2  # rolled back
        traffic.wait_for_answers(2)
    assert traffic.failures == []
    assert live_release(repository) == before
    assert set(traffic.answered_within(0)) == {"new"} and set(traffic.answered_within(2)) == {"old"}


def test_response_cache_hits_show_in_metrics_and_never_outlive_a_release(live, control, sources):
    repository = live.options.repository
    before, newest = live_release(repository), releases(repository)[-1]
    probe = [f"{TEXTS[0]} {uuid.uuid4().hex[:8]}"]  # never sent before: its first request is a miss
    with client_for(live, "grpc") as client:
        counts = embed_cache_counts(live)
        first = client.embed(probe)
        assert embed_cache_counts(live) == (counts[0], counts[1] + 1)
        assert np.array_equal(client.embed(probe), first)
        assert embed_cache_counts(live) == (counts[0] + 1, counts[1] + 1)
        released = publish(tiny_spec(sources["new"]), None, repository, control, Console(stderr=True))
        after_publish = client.embed(probe)
        rollback(repository, control, to=before)
        after_rollback = client.embed(probe)
    assert released == newest + 1
    np.testing.assert_allclose(first, references_for(sources, "old", probe), atol=1e-4)
    np.testing.assert_allclose(after_publish, references_for(sources, "new", probe), atol=1e-4)  # not the cached one
    np.testing.assert_allclose(after_rollback, references_for(sources, "old", probe), atol=1e-4)


def tree_digest(repository: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(repository.rglob("*")):
        digest.update(str(path.relative_to(repository)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize(
    "change, error",
    [
        ("broken_source", "not a Hugging Face model directory"),
        ("corrupt_weights", "cannot load"),
        ("other_shape", "changes the config of"),
        ("worse_ranking", "below the live release's .* by more than serving.max_ndcg_drop"),
    ],
)
def test_a_bad_release_is_refused_before_the_live_repository_changes(
    live, control, sources, references, tmp_path, change, error
):
    repository = live.options.repository
    if change == "broken_source":
        spec = tiny_spec(tmp_path / "missing")
    elif change == "corrupt_weights":
        corrupt = make_tiny_bert(tmp_path / "corrupt", seed=13)
        (corrupt / "model.safetensors").write_bytes(b"not weights")
        spec = tiny_spec(corrupt)
    elif change == "other_shape":
        spec = tiny_spec(sources["new"], max_seq_len=64)
    else:  # a drop of -1 demands an NDCG@5 gain of 1.0, which no release can show
        spec = tiny_spec(sources["new"], max_ndcg_drop=-1.0)
    before = tree_digest(repository)
    with Traffic(live, references) as traffic, pytest.raises(EcomserveError, match=error):
        publish(spec, None, repository, control, Console(stderr=True))
    assert traffic.failures == []
    assert tree_digest(repository) == before
    assert {name for *_, name in traffic.answers} == {"old"}


def test_rollback_needs_an_earlier_release(live, control):
    with pytest.raises(RepositoryError, match="not an earlier release"):
        rollback(live.options.repository, control, to=99)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_model_control_requires_the_admin_key(live, protocol):
    if protocol == "http":
        client = httpclient.InferenceServerClient(live.http_url)
    else:
        client = grpcclient.InferenceServerClient(live.grpc_url)
    header = ADMIN_HEADER
    with pytest.raises(InferenceServerException, match="needs the admin key"):
        client.load_model("embed")
    with pytest.raises(InferenceServerException, match="needs the admin key"):
        client.unload_model("embed", headers={header: "wrong"})
    with pytest.raises(InferenceServerException, match="needs the admin key"):
        client.get_model_repository_index()
    index = client.get_model_repository_index(headers={header: ADMIN_KEY})
    names = {m["name"] for m in index} if protocol == "http" else {m.name for m in index.models}
    assert {"embed", "embedder", "rank", "classify"} <= names
    # inference stays open, and the refused calls changed nothing
    assert client.is_model_ready("embed")
    client.close()


def youngest_stub(server_pid: int, model_file: str) -> int:
    """The newest living stub process running `model_file` (a path suffix): one that serves, not an old
    instance still being unloaded after a restart."""
    stubs = []
    for child in psutil.Process(server_pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and child.cmdline()[1].endswith(model_file):
                stubs.append((child.create_time(), child.pid))
        except (psutil.Error, IndexError):
            continue
    return max(stubs)[1]


def test_search_never_mixes_releases(live, control, sources):
    """`search` embeds queries with the release that embedded its index, whatever `embed` serves, and
    refuses once that release is unloaded, until the index is rebuilt."""
    repository = live.options.repository
    spec = tiny_spec(sources["old"])
    titles = corpus_lines("titles.txt")[:60]
    items = [CatalogItem(f"sku-{i}", title) for i, title in enumerate(titles)]
    target = index_dir(spec, repository.parent)

    def expected_scores(release: int, query: str) -> np.ndarray:
        embed = release_embedder(repository, release, spec)
        return np.sort(embed(titles) @ embed([query])[0])[::-1][:5]

    indexed = live_release(repository)
    build_index(spec, repository, items, target, Console(stderr=True))
    with client_for(live, "grpc") as client:
        before = client.search(TEXTS[0], top_k=5, mode="dense").scores
        np.testing.assert_allclose(before, expected_scores(indexed, TEXTS[0]), atol=1e-5)
        newer = publish(tiny_spec(sources["new"]), None, repository, control, Console(stderr=True))
        # `embed` now serves the new release; search still compares old vectors with old vectors
        np.testing.assert_allclose(client.embed(TEXTS[:1]), references_for(sources, "new")[:1], atol=1e-4)
        np.testing.assert_allclose(client.search(TEXTS[0], top_k=5, mode="dense").scores, before, atol=1e-5)
        newest = publish(tiny_spec(sources["old"]), None, repository, control, Console(stderr=True))
        assert indexed not in (newer, newest)
        # (a query answered before may still come from the result cache: old vectors against old vectors)
        with pytest.raises(EcomserveError, match=f"embedded by release {indexed}, which is not loaded"):
            client.search(TEXTS[1], top_k=5)
        build_index(spec, repository, items, target, Console(stderr=True))
        # Each `search` instance looks at the manifest again MANIFEST_CHECK_S after its last look: one that
        # answered just before the rebuild may answer from the old version until then.
        time.sleep(MANIFEST_CHECK_S)
        expected = expected_scores(newest, TEXTS[0])
        for _ in range(2 * HEAD_INSTANCES):  # every instance answers from the rebuilt index
            np.testing.assert_allclose(client.search(TEXTS[0], top_k=5, mode="dense").scores, expected, atol=1e-5)


def references_for(sources, name: str, texts: list[str] = TEXTS) -> np.ndarray:
    return TorchReference(str(sources[name]), max_seq_len=32).embed(texts)


@pytest.mark.parametrize("model", ["embedder", "rank"])
def test_server_recovers_when_a_python_stub_dies(live, model, caplog):
    """ecomserve's watchdog restarts a model whose stub died (Triton 2.51 does not restart it): requests
    until then may fail, every one after succeeds. Twice, so the replacement stub is recovered too."""
    release = live_release(live.options.repository)
    # A stub that serves the traffic below: the live release's embedder, or one of rank's two instances.
    stub_path = f"/{model}/{release if model == 'embedder' else 1}/model.py"

    def restarts() -> int:
        return sum(f"model '{model}' restarted" in record.getMessage() for record in caplog.records)

    with client_for(live, "http") as client:
        live_answers = client.embed(TEXTS)
        for death in (1, 2):
            os.kill(youngest_stub(live.pid, stub_path), signal.SIGKILL)
            assert wait_for(lambda death=death: restarts() == death, timeout_s=30), f"no restart after death {death}"
            np.testing.assert_allclose(
                client.embed([f"a text never sent before stub death {death}"] + TEXTS)[1:], live_answers, atol=1e-4
            )
            for _ in range(6):  # every instance answers
                np.testing.assert_allclose(client.embed(TEXTS), live_answers, atol=1e-4)
                assert len(client.rank(TEXTS[1], CANDIDATES).scores) == len(CANDIDATES)
    assert live.is_running()
