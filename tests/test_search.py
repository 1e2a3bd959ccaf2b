"""The `search` model on real tritonservers, for each index backend (faiss in-process, Milvus Lite):
exact answers, the TOP_K rules, catalog upserts and deletes under traffic, the result cache, the query
and passage prompts (of `rank` too); and on the default MiniLM pipeline, search quality against `rank`
over the whole catalog."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from rich.console import Console
from support import client_for, make_tiny_bert, metric_total, spec_from, start_server, wait_for
from tritonclient.utils import InferenceServerException

from ecomserve.errors import RequestFailed
from ecomserve.evaluation import load_eval_set, ndcg_at_k
from ecomserve.index.catalog import CatalogError, CatalogItem, read_catalog, read_manifest, write_manifest
from ecomserve.index.loading import load_index
from ecomserve.index.ops import build_index, delete_items, index_dir, upsert_items
from ecomserve.paths import corpus_lines
from ecomserve.prompts import PASSAGE_PROMPT, QUERY_PROMPT, with_prompt
from ecomserve.repository.inprocess import release_embedder
from ecomserve.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["red running shoes", "espresso machine", "wireless headphones", "yoga mat", "kids toys"]
# The catalog pipelines have E5-style prompts, so every search test here runs through them.
PROMPTS = {"query": "query: ", "passage": "passage: "}
INDEX_CHECK_S = 0.35  # `search` re-reads index.json at a request 0.25 s or more after its last look


def catalog_items() -> list[CatalogItem]:
    return [CatalogItem(f"sku-{i}", title) for i, title in enumerate(corpus_lines("titles.txt"))]


@pytest.fixture(scope="module", params=["faiss", "milvus"])
def catalog(request, tmp_path_factory):
    """A tiny-BERT server with `search` on the given backend, and its index built from 800 titles."""
    root = tmp_path_factory.mktemp(f"search_{request.param}")
    search = {
        "backend": request.param,
        "max_top_k": 20,
        "rerank": {"enabled": True, "candidates": 30},
        "cache": {"size": 1000, "ttl_s": 60},
    }
    stop_milvus = None
    if request.param == "milvus":
        from ecomserve.index.milvus_lite import start_milvus_lite

        milvus = start_milvus_lite(root / "milvus.db")
        stop_milvus = milvus.stop
        search["milvus"] = {"uri": milvus.uri}
    spec = spec_from(
        {
            "encoders": [
                {
                    "name": "tiny",
                    "source": str(make_tiny_bert(root / "tiny", seed=21)),
                    "max_seq_len": 32,
                    "prompts": PROMPTS,
                }
            ],
            # A small admission budget: 200 concurrent searches must meet it (test_search_overload_…).
            "serving": {"instances": 1, "front": {"max_texts_in_flight": 8}},
            "search": search,
        }
    )
    server = start_server(spec, root)
    repository = server.options.repository
    target = index_dir(spec, repository.parent)
    build_index(spec, repository, catalog_items(), target, Console(stderr=True))
    yield {"server": server, "spec": spec, "repository": repository, "index": target}
    server.stop()
    if stop_milvus is not None:
        stop_milvus()


def exact_top(catalog, query: str, k: int, items: list[CatalogItem]) -> list[str]:
    embed, prompts = release_embedder(catalog["repository"], 1, catalog["spec"]), catalog["spec"].prompts
    titles = embed(with_prompt(prompts, PASSAGE_PROMPT, [item.title for item in items]))
    scores = titles @ embed(with_prompt(prompts, QUERY_PROMPT, [query]))[0]
    return [items[i].id for i in np.argsort(-scores, kind="stable")[:k]]


@pytest.mark.integration
def test_search_returns_the_exact_top_k(catalog, protocol):
    items = catalog_items()
    with client_for(catalog["server"], protocol) as client:
        for query in QUERIES:
            found = client.search(query, top_k=10)
            assert found.ids == exact_top(catalog, query, 10, items)
            assert np.all(np.diff(found.scores) <= 1e-6)  # best first
        assert len(client.search(QUERIES[0]).ids) == 10  # the spec's default top_k


@pytest.mark.integration
@pytest.mark.parametrize("top_k", [0, -3, 21])
def test_top_k_out_of_bounds_is_refused(catalog, protocol, top_k):
    server = catalog["server"]
    module, url = (httpclient, server.http_url) if protocol == "http" else (grpcclient, server.grpc_url)
    client = module.InferenceServerClient(url)
    query = module.InferInput("QUERY", [1], "BYTES")
    query.set_data_from_numpy(np.array([b"red running shoes"], dtype=np.object_))
    count = module.InferInput("TOP_K", [1], "INT32")
    count.set_data_from_numpy(np.array([top_k], dtype=np.int32))
    with pytest.raises(InferenceServerException) as refused:
        client.infer("search", [query, count])
    assert "TOP_K" in refused.value.message() and "1 to 20" in refused.value.message()
    assert str(refused.value.status()) in ("400", "StatusCode.INVALID_ARGUMENT")
    client.close()
    with client_for(server, protocol) as ecom:  # still answering
        assert len(ecom.search("red running shoes", top_k=3).ids) == 3


@pytest.mark.integration
def test_query_search_prints_json(catalog):
    import subprocess
    import sys

    server = catalog["server"]
    printed = subprocess.run(
        [sys.executable, "-m", "ecomserve", "query", "search", QUERIES[0], "--top-k", "4", "--url", server.http_url],
        capture_output=True,
        text=True,
    )
    assert printed.returncode == 0, printed.stderr
    answer = json.loads(printed.stdout)
    assert answer["ids"] == exact_top(catalog, QUERIES[0], 4, catalog_items()) and len(answer["scores"]) == 4


@pytest.mark.integration
def test_empty_query_is_refused(catalog):
    with client_for(catalog["server"], "http") as client, pytest.raises(RequestFailed, match="QUERY.*empty"):
        client.search("   ")


def cache_count(server, result: str) -> float:
    return metric_total(server, "ecomserve_search_cache_total", result=result)


@pytest.mark.integration
def test_upserts_and_deletes_show_within_seconds_under_traffic(catalog):
    server, spec, repository, target = catalog["server"], catalog["spec"], catalog["repository"], catalog["index"]
    new_item = CatalogItem("sku-new", "zebra print velvet armchair")
    failures, stop = [], threading.Event()

    def traffic(index: int) -> None:
        with client_for(server, ("http", "grpc")[index % 2]) as client:
            while not stop.is_set():
                try:
                    assert len(client.search(QUERIES[index % len(QUERIES)], top_k=5).ids) == 5
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    failures.append(repr(exc))

    def top_id(client) -> str:
        return client.search(new_item.title, top_k=1).ids[0]

    threads = [threading.Thread(target=traffic, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        with client_for(server, "http") as client:
            assert top_id(client) != new_item.id
            hits_before = cache_count(server, "hit")
            for _ in range(3):  # the same query again: each of the 2 instances answers it from its cache
                top_id(client)
            assert cache_count(server, "hit") >= hits_before + 1
            upsert_items(spec, repository, [new_item], target, Console(stderr=True))
            assert wait_for(lambda: top_id(client) == new_item.id), "upsert not visible within 5 s"
            delete_items(spec, [new_item.id], target)
            assert wait_for(lambda: top_id(client) != new_item.id), "delete not visible within 5 s"
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert failures == []


@pytest.mark.integration
def test_rank_search_and_the_index_put_the_prompts_before_their_texts(catalog):
    """rank's score is the cosine of `embed("query: " + q)` and `embed("passage: " + c)`, not of the bare
    texts; search embeds its QUERY with the query prompt, the rerank stage and the index build each title
    with the passage prompt."""
    spec, titles = catalog["spec"], {item.id: item.title for item in catalog_items()}
    assert spec.prompts == PROMPTS
    # Texts no other test sends (`embed` answers repeated texts from its cache), fixed: on this tiny random
    # encoder (seed 21) the prompts move their cosine by 0.046, measured; a shared random suffix made the
    # texts so alike that the prompts moved it by as little as 1e-5.
    query, candidate = "whistling kettle", "electric kettle 1.7l"
    with client_for(catalog["server"], "grpc") as client:
        prompted = client.embed([f"query: {query}", f"passage: {candidate}"])
        score = float(client.rank(query, [candidate]).scores[0])
        bare = client.embed([query, candidate])
        assert abs(score - float(prompted[0] @ prompted[1])) <= 1e-5
        assert abs(score - float(bare[0] @ bare[1])) > 0.01, "the prompts made no difference: the test proves nothing"
        found = client.search(query, top_k=5)
        passages = client.embed([f"passage: {titles[item]}" for item in found.ids])
    # Rerank (on in these pipelines) scores the retrieved titles, embedded live as passages.
    np.testing.assert_allclose(found.scores, passages @ prompted[0], atol=1e-5)
    # The index holds what the build embedded: each title as a passage, and says so.
    manifest, index, _ = load_index(spec.search, catalog["index"])
    assert manifest.passage_prompt == PROMPTS["passage"]
    stored = dict(index.search(prompted[0][None, :], 5)[0])
    assert set(stored) == set(found.ids)
    np.testing.assert_allclose([stored[item] for item in found.ids], found.scores, atol=1e-5)


@pytest.mark.integration
def test_the_byte_limit_applies_to_the_clients_text_not_the_prompt(catalog):
    """limits.max_text_bytes bounds what the client sends; the prompt's bytes come on top, so a text at the
    limit is accepted by rank and search, one byte more is refused naming the tensor and the limit, and
    `embed` (behind which the prompts are put) allows the longest prompt's room."""
    limit = catalog["spec"].limits.max_text_bytes
    nonce = uuid.uuid4().hex[:8]
    at_limit = (f"{nonce} wool socks " * limit)[:limit]
    assert len(at_limit.encode()) == limit
    with client_for(catalog["server"], "http") as client:
        assert client.rank(at_limit, [at_limit]).scores.shape == (1,)
        assert len(client.search(at_limit, top_k=3).ids) == 3
        for call in (lambda: client.rank(at_limit + "x", ["shoe"]), lambda: client.search(at_limit + "x")):
            with pytest.raises(
                RequestFailed, match=rf"QUERY\[0\]: text is {limit + 1} bytes, over the limit of {limit} \("
            ):
                call()
        room = len(PROMPTS["passage"].encode())
        assert client.embed([at_limit + "y" * room]).shape[0] == 1
        with pytest.raises(
            RequestFailed, match=rf"over the limit of {limit + room} \(limits.max_text_bytes \+ {room} "
        ):
            client.embed([at_limit + "y" * (room + 1)])


@pytest.mark.integration
def test_a_prompt_change_needs_an_index_rebuild(catalog):
    """An index embedded with another passage prompt is never mixed with this pipeline's queries: upsert
    refuses it and search answers UNAVAILABLE, both naming the rebuild."""
    spec, target = catalog["spec"], catalog["index"]
    encoders = [
        e.model_copy(update={"prompts": e.prompts.model_copy(update={"passage": "document: "})}) for e in spec.encoders
    ]
    other = spec.model_copy(update={"encoders": encoders})
    with pytest.raises(CatalogError, match="passage prompt 'passage: ' and the spec's is 'document: '.*index build"):
        upsert_items(other, catalog["repository"], [CatalogItem("sku-x", "felt hat")], target, Console(quiet=True))
    live = read_manifest(target)
    write_manifest(target, replace(live, passage_prompt="document: "))  # as if built by the other spec
    try:
        time.sleep(INDEX_CHECK_S)  # every instance's next request re-reads index.json
        with client_for(catalog["server"], "grpc") as client:
            for _ in range(4):  # both instances of `search`
                message = search_error(client)
                assert "passage prompt 'document: ', the spec's is 'passage: '" in message, message
                assert "UNAVAILABLE" in message and "`ecomserve index build CATALOG`" in message, message
    finally:
        write_manifest(target, live)
        time.sleep(INDEX_CHECK_S)
    with client_for(catalog["server"], "grpc") as client:
        assert [search_error(client) for _ in range(4)] == [""] * 4, "search did not recover with the index's prompt"


def search_error(client) -> str:
    """The error a fresh search gets, or "" when it is answered."""
    try:
        client.search(f"felt hat {uuid.uuid4().hex[:6]}", top_k=1)
    except RequestFailed as exc:
        return str(exc)
    return ""


def test_catalog_files_are_read_as_jsonl_and_csv(tmp_path):
    (tmp_path / "items.jsonl").write_text(
        '{"id": "a", "title": "red shoes", "category": "shoes"}\n\n{"id": 7, "title": "mug"}\n'
    )
    (tmp_path / "items.csv").write_text("id,title,price\na,red shoes,10\n7,mug,3\n")
    expected = [CatalogItem("a", "red shoes"), CatalogItem("7", "mug")]
    assert list(read_catalog(tmp_path / "items.jsonl")) == expected == list(read_catalog(tmp_path / "items.csv"))
    (tmp_path / "bad.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(CatalogError, match="bad.jsonl:1: every item needs"):
        list(read_catalog(tmp_path / "bad.jsonl"))


@pytest.mark.integration
def test_search_keeps_the_ndcg_of_rank_over_the_whole_catalog(default_server):
    """Retrieve from the index (then rerank) must rank the eval set as well as `rank` over all products."""
    spec = load_spec(ROOT / "export/default.yaml")
    repository = default_server.options.repository
    eval_set = load_eval_set()
    items = [CatalogItem(pid, title) for pid, title in zip(eval_set.product_ids, eval_set.titles)]
    build_index(spec, repository, items, index_dir(spec, repository.parent), Console(stderr=True))
    position = {pid: i for i, pid in enumerate(eval_set.product_ids)}
    searched, ranked = [], []
    with client_for(default_server, "grpc") as client:
        for query in eval_set.queries:
            gains = eval_set.gains(query)
            found = client.search(query.text, top_k=10)
            scores = np.full(len(items), -np.inf)
            scores[[position[i] for i in found.ids]] = found.scores
            searched.append(ndcg_at_k(scores, gains))
            ranked.append(ndcg_at_k(client.rank(query.text, eval_set.titles).scores, gains))
    assert abs(np.mean(searched) - np.mean(ranked)) <= 0.01
    print(json.dumps({"search_ndcg5": np.mean(searched), "rank_ndcg5": np.mean(ranked)}))


def test_an_interrupted_build_resumes(tmp_path):
    """What a killed build left in <index>.building is kept; only the rest is embedded, then swapped in."""
    from ecomserve.index.catalog import read_manifest, read_titles
    from ecomserve.repository.builder import build_repository

    spec = spec_from(
        {
            "encoders": [{"name": "tiny", "source": str(make_tiny_bert(tmp_path / "tiny", seed=5)), "max_seq_len": 32}],
            "search": {},
        }
    )
    repository = tmp_path / "model_repository"
    build_repository(spec, repository)
    target = index_dir(spec, tmp_path)
    items = catalog_items()[:300]
    build_index(spec, repository, items[:120], target, Console(stderr=True))
    target.rename(target.with_name(target.name + ".building"))  # as if the full build had died here
    console = Console(record=True, width=200)
    manifest = build_index(spec, repository, items, target, console)
    assert "120 items already embedded, 180 to go" in console.export_text()
    assert manifest.items == 300 and read_manifest(target) == manifest
    assert set(read_titles(target)) == {item.id for item in items}
    assert not target.with_name(target.name + ".building").exists()


@pytest.mark.integration
def test_200_concurrent_searches_get_fast_refusals_and_exact_answers(catalog, protocol):
    """`search` has no scheduler queue of its own: the front's admission bounds it like every model."""
    from concurrent.futures import ThreadPoolExecutor

    from raw_protocol import Tensor, infer

    server, items = catalog["server"], catalog_items()
    queries = [f"{QUERIES[i % len(QUERIES)]} {uuid.uuid4().hex[:6]}" for i in range(200)]

    def search(query: str):
        start = time.perf_counter()
        tensors = [Tensor("QUERY", "BYTES", [1], [query.encode()]), Tensor("TOP_K", "INT32", [1], [5])]
        return query, infer(protocol, server, "search", tensors), time.perf_counter() - start

    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(search, queries))
    refused = [(answer, seconds) for _, answer, seconds in results if not answer.ok]
    accepted = [(query, answer) for query, answer, _ in results if answer.ok]
    assert refused and accepted, f"{len(refused)} refused, {len(accepted)} accepted"
    for answer, seconds in refused:
        assert answer.status == ("503" if protocol == "http" else "UNAVAILABLE"), answer.message
        assert "server busy" in answer.message and seconds < 2.0
    for query, answer in accepted[:5]:
        ids = [value.decode() if isinstance(value, bytes) else value for value in answer.outputs["IDS"].ravel()]
        assert ids == exact_top(catalog, query, 5, items)


@pytest.mark.integration
def test_the_http_api_searches_as_the_model_does_with_titles(catalog):
    server, titles = catalog["server"], {item.id: item.title for item in catalog_items()}
    query = QUERIES[1]
    found = client_for(server, "grpc").search(query, top_k=5)
    answer = requests.post(f"{server.api_url}/v1/search", json={"query": query, "top_k": 5}, timeout=30)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["id"] for r in results] == found.ids
    assert [r["title"] for r in results] == [titles[item] for item in found.ids]
    np.testing.assert_allclose([r["score"] for r in results], found.scores, atol=1e-6)
    refused = requests.post(f"{server.api_url}/v1/search", json={"query": query, "top_k": 21}, timeout=30)
    assert refused.status_code == 400 and "TOP_K" in refused.json()["error"]["message"]
