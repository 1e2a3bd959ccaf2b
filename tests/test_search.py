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
from ecomserve.index.catalog import (
    CatalogError,
    CatalogItem,
    read_catalog,
    read_items,
    read_manifest,
    write_manifest,
)
from ecomserve.index.filters import parse_filter
from ecomserve.index.history import diverse_order
from ecomserve.index.loading import load_index, load_search_index
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


BRANDS, COLORS = ["ASICS", "Yeti", "Hydro Flask", "Sony", 'Qu"ote\\d'], ["black", "red", "blue", "white"]
RARE = (17, 333, 702)  # the only items of the brand "Rarebrand"
# Siblings that differ by model number or capacity (after the 800 titles): lexical and hybrid search must tell them
# apart, where a sentence encoder barely does.
NEAR_DUPLICATES = [
    CatalogItem(
        "sku-xm4", "Sony WH-1000XM4 wireless headphones", brand="Sony", category="audio", price=279, in_stock=True
    ),
    CatalogItem(
        "sku-xm5", "Sony WH-1000XM5 wireless headphones", brand="Sony", category="audio", price=349, in_stock=True
    ),
    CatalogItem(
        "sku-990-2tb", "Samsung 990 PRO 2TB NVMe SSD", brand="Samsung", category="storage", price=169, in_stock=True
    ),
    CatalogItem(
        "sku-990-1tb", "Samsung 990 PRO 1TB NVMe SSD", brand="Samsung", category="storage", price=109, in_stock=False
    ),
]
MODEL_NUMBER_QUERIES = [
    ("WH-1000XM4", "sku-xm4"),
    ("sony wh1000xm5", "sku-xm5"),
    ("990 pro 2tb", "sku-990-2tb"),
    ("samsung 990 PRO 1TB", "sku-990-1tb"),
]


def catalog_items() -> list[CatalogItem]:
    """800 titles with catalog fields for FILTER: brands, prices, stock, attributes (every 50th item has none), and
    the near-duplicate siblings."""
    return [
        CatalogItem(
            f"sku-{i}",
            title,
            **(
                {}
                if i % 50 == 49
                else {
                    "category": ["shoes", "kitchen", "audio"][i % 3],
                    "brand": "Rarebrand" if i in RARE else BRANDS[i % len(BRANDS)],
                    "price": (i * 37) % 500 if i % 2 else (i * 37) % 500 + 0.99,
                    "in_stock": i % 4 != 0,
                    "attributes": {"color": COLORS[i % len(COLORS)], "size": i % 12, "wide": i % 5 == 0},
                }
            ),
        )
        for i, title in enumerate(corpus_lines("titles.txt"))
    ] + NEAR_DUPLICATES


@pytest.fixture(scope="module", params=["faiss", "milvus"])
def catalog(request, tmp_path_factory):
    """A tiny-BERT server with `search` on the given backend, and its index built from 800 titles."""
    root = tmp_path_factory.mktemp(f"search_{request.param}")
    search = {
        "backend": request.param,
        "max_top_k": 20,
        "rerank": {"enabled": True, "candidates": 30},
        "cache": {"size": 1000, "ttl_s": 60},
        # The tests below compare with exact dense answers; the lexical and hybrid tests send MODE.
        "mode": "dense",
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
            # A small admission budget and line: 200 concurrent searches must meet them (test_search_overload_…).
            "serving": {"instances": 1, "front": {"max_texts_in_flight": 8, "max_texts_waiting": 8}},
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
    (tmp_path / "items.csv").write_text("id,title,category\na,red shoes,shoes\n7,mug,\n")
    expected = [CatalogItem("a", "red shoes", category="shoes"), CatalogItem("7", "mug")]
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
    searched, ranked = {"dense": [], "hybrid": [], "lexical": []}, []
    with client_for(default_server, "grpc") as client:
        for query in eval_set.queries:
            gains = eval_set.gains(query)
            for mode, ndcgs in searched.items():
                found = client.search(query.text, top_k=10, mode=mode)
                scores = np.full(len(items), -np.inf)
                # By rank, not score: lexical and hybrid scores are on other scales than rank's cosines.
                scores[[position[i] for i in found.ids]] = -np.arange(len(found.ids))
                ndcgs.append(ndcg_at_k(scores, gains))
            ranked.append(ndcg_at_k(client.rank(query.text, eval_set.titles).scores, gains))
    # Dense retrieval (then rerank when on) ranks as `rank` does; hybrid, the default, loses at most 0.01 of it.
    assert abs(np.mean(searched["dense"]) - np.mean(ranked)) <= 0.01
    assert np.mean(searched["hybrid"]) >= np.mean(searched["dense"]) - 0.01
    report = {f"search_{mode}_ndcg5": float(np.mean(ndcgs)) for mode, ndcgs in searched.items()}
    print(json.dumps({**report, "rank_ndcg5": float(np.mean(ranked))}))


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


def assert_the_api_finds(server, path: str, body: dict, found) -> None:
    """The HTTP API's `path` answers `body` with the model's ids and scores, and the items' titles."""
    titles = {item.id: item.title for item in catalog_items()}
    answer = requests.post(f"{server.api_url}{path}", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["id"] for r in results] == found.ids
    assert [r["title"] for r in results] == [titles[item] for item in found.ids]
    np.testing.assert_allclose([r["score"] for r in results], found.scores, atol=1e-6)


@pytest.mark.integration
def test_the_http_api_searches_as_the_model_does_with_titles(catalog):
    server, query = catalog["server"], QUERIES[1]
    found = client_for(server, "grpc").search(query, top_k=5)
    assert_the_api_finds(server, "/v1/search", {"query": query, "top_k": 5}, found)
    refused = requests.post(f"{server.api_url}/v1/search", json={"query": query, "top_k": 21}, timeout=30)
    assert refused.status_code == 400 and "TOP_K" in refused.json()["error"]["message"]


@pytest.mark.integration
def test_the_http_api_applies_the_prompt_its_input_type_names(catalog):
    server, text = catalog["server"], f"api prompt check {uuid.uuid4().hex[:8]}"
    client = client_for(server, "grpc")
    answers = {}
    for kind in (None, "query", "passage"):
        body = {"input": [text], "model": "tiny", **({"input_type": kind} if kind else {})}
        answer = requests.post(f"{server.api_url}/v1/embeddings", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        answers[kind] = np.array(answer.json()["data"][0]["embedding"], dtype=np.float32)
        expected = client.embed(with_prompt(PROMPTS, kind, [text]))[0]
        np.testing.assert_allclose(answers[kind], expected, rtol=0, atol=1e-6)
    assert float(answers["query"] @ answers["passage"]) < 0.9999  # the prompts changed the vector
    tei = requests.post(f"{server.api_url}/embed", json={"inputs": text, "prompt_name": "query"}, timeout=30)
    np.testing.assert_allclose(np.array(tei.json()[0], dtype=np.float32), answers["query"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# `similar`: items like the given ones, from the same index's stored vectors, never the inputs


def exact_similar(catalog, ids: list[str], k: int) -> tuple[list[str], np.ndarray, dict[str, float]]:
    """The exact answer over the live index's stored vectors: ids, scores and every item's score."""
    from ecomserve.index.history import history_profile

    _, index, titles = load_index(catalog["spec"].search, catalog["index"])
    every = sorted(titles)
    profile = history_profile(index.vectors(ids), catalog["spec"].search.history_half_life)
    scores = index.vectors(every) @ profile
    ranked = [i for i in np.argsort(-scores, kind="stable") if every[i] not in set(ids)][:k]
    return [every[i] for i in ranked], scores[ranked], dict(zip(every, scores.tolist()))


def assert_exact_similar(catalog, ids: list[str], found, k: int) -> None:
    """`found` is the exact top k: the same scores, each the item's own exact score (ties may swap ids)."""
    _, expected_scores, every = exact_similar(catalog, ids, k)
    assert len(found.ids) == k and not set(found.ids) & set(ids)
    np.testing.assert_allclose(found.scores, expected_scores, atol=1e-5)
    np.testing.assert_allclose(found.scores, [every[item] for item in found.ids], atol=1e-5)


@pytest.mark.integration
def test_similar_of_one_item_is_its_nearest_neighbours_never_itself(catalog, protocol):
    with client_for(catalog["server"], protocol) as client:
        for item in ("sku-7", "sku-123", "sku-640"):
            found = client.similar([item], top_k=10)
            assert item not in found.ids
            assert_exact_similar(catalog, [item], found, 10)
            assert np.all(np.diff(found.scores) <= 1e-6)  # best first
        assert len(client.similar(["sku-7"]).ids) == 10  # the spec's default top_k


@pytest.mark.integration
def test_similar_of_a_history_weights_recent_items_more(catalog, protocol):
    history = ["sku-3", "sku-250", "sku-3", "sku-511", "sku-77"]  # most recent last; sku-3 seen twice
    with client_for(catalog["server"], protocol) as client:
        found = client.similar(history, top_k=8)
        assert_exact_similar(catalog, history, found, 8)
        reordered = client.similar(history[::-1], top_k=8)
        assert_exact_similar(catalog, history[::-1], reordered, 8)
    assert not np.allclose(found.scores, reordered.scores, atol=1e-6), "recency made no difference"


@pytest.mark.integration
def test_filtered_similar_returns_min_top_k_matching_items_never_the_inputs(catalog, protocol):
    history = ["sku-17", "sku-4"]  # sku-17 is one of the three Rarebrand items
    _, _, every = exact_similar(catalog, history, 1)
    with client_for(catalog["server"], protocol) as client:
        for raw in FILTERS:
            allowed = {item.id for item in matching(raw)} - set(history)
            found = client.similar(history, top_k=10, filter=raw)
            assert len(found.ids) == min(10, len(allowed)), raw
            assert set(found.ids) <= allowed, raw
            # The exact top among the matching items: each score its own, none better left out.
            best = sorted((every[item] for item in allowed), reverse=True)[: len(found.ids)]
            np.testing.assert_allclose(found.scores, best, atol=1e-5)
            np.testing.assert_allclose(found.scores, [every[item] for item in found.ids], atol=1e-5)
        assert set(client.similar(history, filter={"brand": "Rarebrand"}).ids) == {"sku-333", "sku-702"}
        with pytest.raises(RequestFailed, match="FILTER field 'colour'|unknown field 'colour'"):
            client.similar(history, filter={"colour": "black"})
        assert len(client.similar(history, top_k=3).ids) == 3  # still answering


@pytest.mark.integration
def test_similar_with_diversity_picks_by_maximal_marginal_relevance(catalog, protocol):
    """DIVERSITY d > 0: MMR (history.diverse_order) over the exact top search.diversity_candidates, SCORES each
    item's own cosine to the profile; d = 0 is the plain answer. The diverse list is less alike within itself."""
    search, history, k = catalog["spec"].search, ["sku-40", "sku-41"], 10
    candidates, scores, every = exact_similar(catalog, history, search.diversity_candidates)
    _, index, _ = load_index(search, catalog["index"])

    def likeness(ids: list[str]) -> float:  # mean cosine between two different items of a list
        vectors = index.vectors(ids)
        return float((np.sum(vectors @ vectors.T) - len(ids)) / (len(ids) * (len(ids) - 1)))

    with client_for(catalog["server"], protocol) as client:
        plain = client.similar(history, top_k=k)
        assert client.similar(history, top_k=k, diversity=0.0).ids == plain.ids
        for diversity in (0.3, 0.7):
            found = client.similar(history, top_k=k, diversity=diversity)
            expected = diverse_order(scores, index.vectors(candidates), k, diversity)
            assert found.ids == [candidates[row] for row in expected], diversity
            np.testing.assert_allclose(found.scores, [every[item] for item in found.ids], atol=1e-5)
            assert not set(found.ids) & set(history) and found.ids != plain.ids
            assert likeness(found.ids) < likeness(plain.ids), diversity
        filtered = client.similar(history, top_k=k, filter={"in_stock": True}, diversity=0.7)
        assert {item.id for item in matching({"in_stock": True})} >= set(filtered.ids) and len(filtered.ids) == k
        for bad in (-0.1, 1.5, float("nan")):
            with pytest.raises(RequestFailed, match="DIVERSITY: got .*expected one value from 0 to 1"):
                client.similar(history, diversity=bad)
        assert client.similar(history, top_k=k).ids == plain.ids  # still answering


def raw_similar(server, protocol: str, ids: list[bytes], top_k: int | None = None):
    """`similar` through tritonclient itself: (ids, None) or (None, (status, message))."""
    module, url = (httpclient, server.http_url) if protocol == "http" else (grpcclient, server.grpc_url)
    client = module.InferenceServerClient(url)
    tensor = module.InferInput("ITEM_IDS", [len(ids)], "BYTES")
    tensor.set_data_from_numpy(np.array(ids, dtype=np.object_).reshape(len(ids)))
    inputs = [tensor]
    if top_k is not None:
        count = module.InferInput("TOP_K", [1], "INT32")
        count.set_data_from_numpy(np.array([top_k], dtype=np.int32))
        inputs.append(count)
    try:
        for _attempt in range(20):
            try:
                answer = client.infer("similar", inputs)
                return [value.decode() for value in answer.as_numpy("IDS")], None
            except InferenceServerException as exc:
                # The front counts each id against its texts-in-flight budget (8 here): a long list meets the
                # tail of the previous request now and then, and is refused as busy; that is not this test's point.
                if "server busy" not in (exc.message() or ""):
                    return None, (str(exc.status()), exc.message())
                time.sleep(0.1)
        raise AssertionError("the front stayed busy for 2 s")
    finally:
        client.close()


@pytest.mark.integration
def test_similar_refuses_unknown_ids_and_bad_lists_naming_them(catalog, protocol):
    server, invalid = catalog["server"], ("400", "StatusCode.INVALID_ARGUMENT")
    max_history = catalog["spec"].search.max_history
    _, (status, message) = raw_similar(server, protocol, [b"sku-1", b"no-such-sku", b"sku-2", b"gone-too"])
    assert status in invalid and "no-such-sku" in message and "gone-too" in message, message
    assert "sku-1" not in message, message
    bad_lists = [
        ([], "ITEM_IDS: got 0 ids, expected 1 to"),
        ([b"sku-1"] * (max_history + 1), f"got {max_history + 1} ids, expected 1 to {max_history}"),
        ([b"sku-1", b""], "ITEM_IDS[1]: the id is empty"),
        ([b"x" * 513], "ITEM_IDS[0]: the id is 513 bytes, over the limit of 512"),
        ([b"\xff\xfe"], "ITEM_IDS[0]: not valid UTF-8"),
    ]
    for ids, expected in bad_lists:
        _, (status, message) = raw_similar(server, protocol, ids)
        assert status in invalid and expected in message, message
    _, (status, message) = raw_similar(server, protocol, [b"sku-1"], top_k=21)
    assert status in invalid and "TOP_K" in message and "1 to 20" in message, message
    found, refused = raw_similar(server, protocol, [b"sku-1"] * max_history, top_k=3)  # the limit itself is fine
    assert refused is None and len(found) == 3 and "sku-1" not in found
    with client_for(server, protocol) as client:  # still answering
        assert len(client.similar(["sku-1"], top_k=3).ids) == 3


@pytest.mark.integration
def test_similar_follows_upserts_and_deletes_within_seconds(catalog):
    spec, repository, target = catalog["spec"], catalog["repository"], catalog["index"]
    twin = CatalogItem("sku-twin", catalog_items()[5].title)  # the same title: the same vector as sku-5

    def answer(ids: list[str]) -> list[str] | None:
        try:
            return client.similar(ids, top_k=5).ids
        except RequestFailed as exc:
            assert "unknown item ids ['sku-twin']" in str(exc) and "400" in str(exc), str(exc)
            return None

    with client_for(catalog["server"], "http") as client:
        assert answer([twin.id]) is None and twin.id not in answer(["sku-5"])
        upsert_items(spec, repository, [twin], target, Console(stderr=True))
        assert wait_for(lambda: twin.id in answer(["sku-5"])), "upsert not visible to similar within 5 s"
        time.sleep(INDEX_CHECK_S)  # both instances of `similar` have looked at the index since
        found = client.similar([twin.id, "sku-9"], top_k=5)
        assert twin.id not in found.ids and "sku-9" not in found.ids
        delete_items(spec, [twin.id], target)
        assert wait_for(lambda: answer([twin.id]) is None), "delete not visible to similar within 5 s"
        time.sleep(INDEX_CHECK_S)
        assert twin.id not in answer(["sku-5"]) and answer([twin.id]) is None


@pytest.mark.integration
def test_similar_over_the_http_api_and_the_cli(catalog):
    import subprocess
    import sys

    server, history = catalog["server"], ["sku-40", "sku-41"]
    found = client_for(server, "grpc").similar(history, top_k=5)
    assert_the_api_finds(server, "/v1/similar", {"ids": history, "top_k": 5}, found)
    body = {"ids": ["sku-17"], "filter": {"brand": "Rarebrand"}}  # the other two Rarebrand items
    rare = requests.post(f"{server.api_url}/v1/similar", json=body, timeout=30).json()["results"]
    assert sorted(r["id"] for r in rare) == ["sku-333", "sku-702"]
    for body, expected in (
        ({"ids": ["sku-40"], "filter": {"colour": "x"}}, "unknown field 'colour'"),
        ({"ids": ["sku-40", "no-such-sku"]}, "no-such-sku"),
        ({"ids": []}, "ids"),
        ({"ids": ["sku-40"], "top_k": 21}, "TOP_K"),
        ({"ids": ["sku-40"], "diversity": 2}, "DIVERSITY"),
    ):
        refused = requests.post(f"{server.api_url}/v1/similar", json=body, timeout=30)
        assert refused.status_code == 400 and expected in refused.json()["error"]["message"], refused.text
    printed = subprocess.run(
        [sys.executable, "-m", "ecomserve", "query", "similar", *history, "--top-k", "5", "--url", server.http_url],
        capture_output=True,
        text=True,
    )
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout)["ids"] == found.ids


# ---------------------------------------------------------------------------------------------------------------
# FILTER: catalog fields filtered inside the index search

FILTERS = [
    {"brand": "ASICS"},
    {"brand": {"in": ["Yeti", 'Qu"ote\\d']}},
    {"price": {"gte": 50, "lte": 300}},
    {"price": {"gt": 450}, "in_stock": True},
    {"category": "audio", "attributes.color": "black", "attributes.size": {"lt": 6}},
    {"attributes.wide": True, "in_stock": False},
    {"brand": "Rarebrand"},  # 3 items
    {"brand": "Nobody"},  # none
]


def matching(raw: dict, items: list[CatalogItem] | None = None) -> list[CatalogItem]:
    where = parse_filter(raw)
    return [item for item in items or catalog_items() if where.matches(item.filter_fields())]


@pytest.mark.integration
def test_filtered_search_returns_min_top_k_matching_items(catalog, protocol):
    assert len(matching({"brand": "Rarebrand"})) == 3 and not matching({"brand": "Nobody"})
    everything = catalog_items()
    embed, prompts = release_embedder(catalog["repository"], 1, catalog["spec"]), catalog["spec"].prompts
    titles = embed(with_prompt(prompts, PASSAGE_PROMPT, [item.title for item in everything]))
    with client_for(catalog["server"], protocol) as client:
        for query in QUERIES[:2]:
            scores = titles @ embed(with_prompt(prompts, QUERY_PROMPT, [query]))[0]
            for raw in FILTERS:
                where = parse_filter(raw)
                rows = [i for i, item in enumerate(everything) if where.matches(item.filter_fields())]
                found = client.search(query, top_k=10, filter=raw)
                assert len(found.ids) == min(10, len(rows)), raw
                # The exact top within the filter (rerank keeps to it too), each result satisfying the filter.
                best = [rows[i] for i in np.argsort(-scores[rows], kind="stable")[:10]]
                assert found.ids == [everything[i].id for i in best], raw
        # The result cache keys by the filter: the same query with another filter gets another answer.
        assert client.search(QUERIES[0], top_k=10, filter=FILTERS[0]).ids != client.search(QUERIES[0], top_k=10).ids


def raw_search(server, protocol: str, query: bytes = b"red running shoes", **extra: bytes):
    """`search` with extra BYTES inputs (FILTER=…, MODE=…) through tritonclient itself: (ids, None) or
    (None, (status, message))."""
    module, url = (httpclient, server.http_url) if protocol == "http" else (grpcclient, server.grpc_url)
    client = module.InferenceServerClient(url)
    inputs = []
    for name, value in (("QUERY", query), *extra.items()):
        tensor = module.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([value], dtype=np.object_))
        inputs.append(tensor)
    try:
        return [value.decode() for value in client.infer("search", inputs).as_numpy("IDS")], None
    except InferenceServerException as exc:
        return None, (str(exc.status()), exc.message())
    finally:
        client.close()


BAD_FILTERS = [
    (b'{"colour": "black"}', "unknown field 'colour'"),
    (b'{"price": {"between": [1, 2]}}', "unknown operator 'between'"),
    (b'{"brand": 3}', "field 'brand': expected a string"),
    (b'{"in_stock": "yes"}', "field 'in_stock': expected true or false"),
    (b'{"price": {"gte": "cheap"}}', "'gte': expected a number"),
    (b'{"brand": ', "malformed JSON"),
    (b'["brand"]', "expected a JSON object"),
    (b"[" * 3000 + b"]" * 3000, "bytes, at most"),
]


@pytest.mark.integration
def test_bad_filters_are_refused_naming_them_and_the_server_stays_ready(catalog, protocol):
    server = catalog["server"]
    for value, expected in BAD_FILTERS:
        _, (status, message) = raw_search(server, protocol, FILTER=value)
        assert status in ("400", "StatusCode.INVALID_ARGUMENT"), (status, message)
        assert "FILTER" in message and expected in message, message
    found, refused = raw_search(server, protocol, FILTER=b'{"brand": "ASICS"}')
    assert refused is None and len(found) == 10
    with client_for(server, protocol) as client:  # still answering
        assert client.is_ready() and len(client.search(QUERIES[0], top_k=3, filter={"brand": "Yeti"}).ids) == 3


@pytest.mark.integration
def test_the_http_api_and_the_cli_filter_searches(catalog):
    import subprocess
    import sys

    server, raw = catalog["server"], {"brand": "Rarebrand"}
    found = client_for(server, "grpc").search(QUERIES[0], top_k=10, filter=raw)
    answer = requests.post(f"{server.api_url}/v1/search", json={"query": QUERIES[0], "filter": raw}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert [r["id"] for r in answer.json()["results"]] == found.ids and len(found.ids) == 3
    for body, expected in (({"colour": "x"}, "unknown field 'colour'"), ({"price": "x"}, "expected a number")):
        refused = requests.post(f"{server.api_url}/v1/search", json={"query": QUERIES[0], "filter": body}, timeout=30)
        assert refused.status_code == 400 and expected in refused.json()["error"]["message"], refused.text
    printed = subprocess.run(
        [sys.executable, "-m", "ecomserve", "query", "search", QUERIES[0], "--filter", json.dumps(raw)]
        + ["--url", server.http_url],
        capture_output=True,
        text=True,
    )
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout)["ids"] == found.ids


@pytest.mark.integration
def test_upserts_and_deletes_change_filter_results_within_seconds(catalog):
    spec, repository, target = catalog["spec"], catalog["repository"], catalog["index"]
    original = catalog_items()[RARE[0]]
    new = CatalogItem("sku-filter-new", "zebra print velvet armchair", brand="Rarebrand", price=12, in_stock=True)
    rare = {"brand": "Rarebrand"}

    def rare_ids(client) -> set[str]:
        return set(client.search(new.title, top_k=10, filter=rare).ids)

    with client_for(catalog["server"], "http") as client:
        before = rare_ids(client)
        assert before == {f"sku-{i}" for i in RARE}
        upsert_items(spec, repository, [new], target, Console(stderr=True))
        assert wait_for(lambda: rare_ids(client) == before | {new.id}), "upsert not visible to filters within 5 s"
        assert read_items(target)[new.id] == new.extras() == {"brand": "Rarebrand", "price": 12, "in_stock": True}
        moved = replace(original, brand="Otherbrand")
        upsert_items(spec, repository, [moved], target, Console(stderr=True))  # its brand changed
        assert wait_for(lambda: rare_ids(client) == before - {original.id} | {new.id}), "field change not visible"
        other = {"brand": "Otherbrand"}  # each instance of `search` sees the change at its next look
        assert wait_for(lambda: client.search(new.title, top_k=10, filter=other).ids == [original.id])
        delete_items(spec, [new.id], target)
        assert wait_for(lambda: rare_ids(client) == before - {original.id}), "delete not visible to filters"
        upsert_items(spec, repository, [original], target, Console(stderr=True))  # as the other tests expect it
        assert wait_for(lambda: rare_ids(client) == before)


# ---------------------------------------------------------------------------------------------------------------
# MODE: dense, lexical (BM25) and hybrid (both, fused with RRF) retrieval


@pytest.mark.integration
def test_model_number_queries_put_the_exact_item_first_in_hybrid_and_lexical_mode(catalog, protocol):
    dense_misses = []
    with client_for(catalog["server"], protocol) as client:
        for query, expected in MODEL_NUMBER_QUERIES:
            for mode in ("hybrid", "lexical"):
                found = client.search(query, top_k=5, mode=mode)
                assert found.ids[0] == expected, (query, mode, found.ids)
                assert np.all(np.diff(found.scores) <= 1e-6) and found.scores[0] > found.scores[1], (query, mode)
            dense = client.search(query, top_k=5, mode="dense")
            assert dense.ids == client.search(query, top_k=5).ids  # the spec's search.mode (dense here)
            if dense.ids[0] != expected:
                dense_misses.append(query)
    # The tiny random encoder (seed 21) cannot tell the siblings apart: dense alone gets these wrong.
    assert dense_misses, "dense got every model number right: this test shows nothing about lexical retrieval"
    print(json.dumps({"dense_misses": dense_misses}))


@pytest.mark.integration
def test_hybrid_scores_are_reciprocal_rank_fusion_of_the_dense_and_lexical_lists(catalog):
    spec = catalog["spec"].search
    query, k = "sony wireless headphones", 10
    with client_for(catalog["server"], "grpc") as client:
        hybrid = client.search(query, top_k=k, mode="hybrid")
    _, index, _, lexical = load_search_index(spec, catalog["index"])
    embed = release_embedder(catalog["repository"], 1, catalog["spec"])
    vector = embed(with_prompt(PROMPTS, QUERY_PROMPT, [query]))
    dense = index.search(vector, spec.fusion.candidates)[0]
    words = lexical.search(query, spec.fusion.candidates)
    expected = {}
    # A query of words only: BM25's list counts with lexical_weight, the dense list with 1.
    for hits, weight in ((dense, 1.0), (words, spec.fusion.lexical_weight)):
        for rank, (item, _) in enumerate(hits, start=1):
            expected[item] = expected.get(item, 0.0) + weight / (spec.fusion.rrf_k + rank)
    np.testing.assert_allclose(hybrid.scores, [expected[item] for item in hybrid.ids], rtol=1e-5)
    assert sorted(expected.values(), reverse=True)[:k] == pytest.approx(list(hybrid.scores), rel=1e-5)


@pytest.mark.integration
def test_filtered_hybrid_and_lexical_searches_return_only_matching_items(catalog, protocol):
    items = catalog_items()
    with client_for(catalog["server"], protocol) as client:
        for raw in [*FILTERS, {"brand": "Samsung", "in_stock": True}, {"category": "storage"}]:
            allowed = {item.id for item in matching(raw, items)}
            hybrid = client.search("990 pro 2tb", top_k=10, filter=raw, mode="hybrid")
            assert set(hybrid.ids) <= allowed and len(hybrid.ids) == min(10, len(allowed)), raw
            lexical = client.search("990 pro 2tb sony asics", top_k=10, filter=raw, mode="lexical")
            assert set(lexical.ids) <= allowed and len(lexical.ids) <= min(10, len(allowed)), raw
        in_stock = client.search("990 pro", top_k=10, filter={"in_stock": True}, mode="lexical").ids
        assert in_stock[0] == "sku-990-2tb" and "sku-990-1tb" not in in_stock  # the 1TB one is out of stock
        # The result cache keys by the mode: the same query in another mode gets its own answer (dense always has
        # 10; lexical only the 2 SSDs and the 4 titles with "pro").
        assert len(client.search("990 pro", top_k=10, mode="dense").ids) == 10
        lexical = client.search("990 pro", top_k=10, mode="lexical").ids
        assert set(lexical[:2]) == {"sku-990-2tb", "sku-990-1tb"} and len(lexical) == 6


@pytest.mark.integration
def test_upserts_and_deletes_change_lexical_results_within_seconds(catalog):
    spec, repository, target = catalog["spec"], catalog["repository"], catalog["index"]
    new = CatalogItem("sku-lex-new", "Bose QC-45Z noise cancelling earbuds", brand="Bose", price=199, in_stock=True)

    def found(client, query: str, mode: str = "lexical", **extra) -> list[str]:
        return client.search(query, top_k=5, mode=mode, **extra).ids

    def first(client, query: str, mode: str = "lexical", **extra) -> str | None:
        return next(iter(found(client, query, mode, **extra)), None)

    with client_for(catalog["server"], "http") as client:
        assert new.id not in found(client, "qc-45z")
        upsert_items(spec, repository, [new], target, Console(stderr=True))
        assert wait_for(lambda: first(client, "qc-45z") == new.id), "upsert not visible to lexical within 5 s"
        assert wait_for(lambda: first(client, "bose qc45z", "hybrid") == new.id)
        # Each search instance reloads on its own: another one may answer this request, within the same 5 s.
        assert wait_for(lambda: first(client, "qc45z", filter={"brand": "Bose"}) == new.id)
        assert new.id not in found(client, "qc45z", filter={"brand": "Sony"})
        renamed = replace(new, title="Bose Ultra-77K noise cancelling earbuds")  # no token of "qc-45z" left
        upsert_items(spec, repository, [renamed], target, Console(stderr=True))
        assert wait_for(lambda: first(client, "ultra-77k") == new.id and new.id not in found(client, "qc-45z"))
        delete_items(spec, [new.id], target)
        assert wait_for(lambda: new.id not in found(client, "ultra-77k")), "delete not visible to lexical within 5 s"
        assert wait_for(lambda: new.id not in found(client, "bose ultra-77k noise cancelling earbuds", "hybrid"))


@pytest.mark.integration
def test_an_unknown_mode_is_refused_naming_it_and_the_server_stays_ready(catalog, protocol):
    server = catalog["server"]
    for value in (b"fuzzy", b"HYBRID", b""):
        _, (status, message) = raw_search(server, protocol, b"990 pro 2tb", MODE=value)
        assert status in ("400", "StatusCode.INVALID_ARGUMENT"), (status, message)
        assert "MODE" in message and f"unknown mode {value.decode()!r}" in message, message
        assert "hybrid, dense, lexical" in message, message
    found, refused = raw_search(server, protocol, b"990 pro 2tb", MODE=b"lexical")
    assert refused is None and found[0] == "sku-990-2tb"
    with client_for(server, protocol) as client:  # still answering
        assert client.is_ready() and len(client.search(QUERIES[0], top_k=3, mode="hybrid").ids) == 3


@pytest.mark.integration
def test_the_http_api_and_the_cli_send_the_mode(catalog):
    import subprocess
    import sys

    server = catalog["server"]
    found = client_for(server, "grpc").search("WH-1000XM4", top_k=3, mode="lexical")
    body = {"query": "WH-1000XM4", "top_k": 3, "mode": "lexical"}
    answer = requests.post(f"{server.api_url}/v1/search", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["id"] for r in results] == found.ids and results[0]["title"] == "Sony WH-1000XM4 wireless headphones"
    refused = requests.post(f"{server.api_url}/v1/search", json={**body, "mode": "fuzzy"}, timeout=30)
    assert refused.status_code == 400 and "unknown mode 'fuzzy'" in refused.json()["error"]["message"], refused.text
    printed = subprocess.run(
        [sys.executable, "-m", "ecomserve", "query", "search", "WH-1000XM4", "--top-k", "3", "--mode", "lexical"]
        + ["--url", server.http_url],
        capture_output=True,
        text=True,
    )
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout)["ids"] == found.ids
