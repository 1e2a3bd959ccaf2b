"""The Locust load test, run for real: locust as a subprocess, headless and bounded in time, against the session's
tritonserver on loopback (HTTP and gRPC) and its HTTP API (OpenAI /v1/embeddings, Cohere /v1/rerank, /v1/search,
/v1/similar; the catalog scenarios over the load test's catalog, indexed into that server); those tests are marked
integration. The rest needs no server: the load test's plain parts (answer checks, API request bodies,
stage tables, SLO arithmetic), the API users against a recording HTTP server in this process, and the structure of
the Kubernetes manifests.

Locust is never imported here: it monkey-patches the standard library of the process that imports it."""

from __future__ import annotations

import base64
import csv
import importlib.util
import json
import os
import random
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from PIL import Image
from rich.console import Console
from support import client_for, embed_cache_counts, metric_total, wait_for

from ecomserve.errors import RequestFailed
from ecomserve.index.catalog import read_catalog
from ecomserve.index.filters import parse_filter
from ecomserve.index.ops import build_index, index_dir
from ecomserve.server.process import free_port
from ecomserve.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
LOADTEST = ROOT / "loadtest"
LOCUSTFILE = LOADTEST / "locustfile.py"
SCENARIO_NAMES = ["rank search", "embed query", "embed items", "classify category"]
ALL_REQUEST_NAMES = {f"{protocol} {name}" for protocol in ("http", "grpc") for name in SCENARIO_NAMES}
# One user per class with -u 8: every scenario of the default mix (not the catalog ones) over both protocols. Small
# requests keep 2 cores responsive.
EVERY_USER = ["-u", "8", "-r", "8", "--candidates", "8", "--recommend-items", "32"] + [
    arg for flag in ("search", "query-embedding", "recommendation", "category") for arg in (f"--weight-{flag}", "1")
]
# One user per API class (the API has no classify): /v1/rerank with 8 documents, /v1/embeddings with 1 and 32 texts.
EVERY_API_USER = ["-u", "3", "-r", "3", "--candidates", "8", "--recommend-items", "32", "--protocols", "api"] + [
    arg for flag in ("search", "query-embedding", "recommendation") for arg in (f"--weight-{flag}", "1")
]
SLO_FAILED_EXIT_CODE = 3
OPTION_REFUSED_EXIT_CODE = 1
API_REQUEST_NAMES = {"api rank search", "api embed query", "api embed items"}
API_KEY_ENV = "ECOMSERVE_API_KEY"
CATALOG_CSV = LOADTEST / "data" / "catalog.csv"
MODES = ("dense", "hybrid", "lexical")
CATALOG_NAMES = {f"search {mode}{suffix}" for mode in MODES for suffix in ("", " filtered")} | {
    f"similar {kind}{suffix}" for kind in ("item", "history") for suffix in ("", " filtered")
}
CATALOG_USERS = [
    f"{scenario}{protocol}User" for scenario in ("CatalogSearch", "Similar") for protocol in ("Http", "Grpc", "Api")
]


def load_module(name: str, uses: tuple[str, ...] = ()):
    """One of loadtest/'s plain modules (no Locust inside), under a name that cannot shadow anything. `uses` names the
    loadtest modules it imports: it gets them as loaded here (so there is one WrongAnswer class), and only while it
    loads."""
    qualified = f"loadtest_{name}"
    if qualified not in sys.modules:
        siblings = {sibling: load_module(sibling) for sibling in uses}
        saved = {sibling: sys.modules.get(sibling) for sibling in uses}
        spec = importlib.util.spec_from_file_location(qualified, LOADTEST / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module  # dataclasses look their module up while the class is built
        sys.modules.update(siblings)
        try:
            spec.loader.exec_module(module)
        finally:
            for sibling, previous in saved.items():
                if previous is None:
                    sys.modules.pop(sibling, None)
                else:
                    sys.modules[sibling] = previous
    return sys.modules[qualified]


def locust_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *args]


def clean_env() -> dict[str, str]:
    """No LOCUST_* settings and no API key from the calling shell: the tests pass every option they mean."""
    return {key: value for key, value in os.environ.items() if not key.startswith("LOCUST_") and key != API_KEY_ENV}


def targets(server) -> list[str]:
    return ["--host", f"http://{server.http_url}", "--grpc-host", server.grpc_url]


def run_locust(*args: str, server, cwd: Path, timeout_s: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(
        locust_command(*targets(server), *args),
        cwd=cwd,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout_s,
    )
    # The session's server serves the rest of the suite: a load test must leave it ready.
    assert server.is_ready(), f"tritonserver not ready after the load test:\n{server.log_excerpt()}"
    return result


def request_stats(prefix: Path) -> dict[str, dict[str, str]]:
    with Path(f"{prefix}_stats.csv").open(newline="") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def tail(output: str, lines: int = 40) -> str:
    return "\n".join(output.splitlines()[-lines:])


@pytest.mark.integration
def test_every_scenario_over_both_protocols_passes(default_server, tmp_path):
    prefix = tmp_path / "mixed"
    result = run_locust(
        "--headless", "-t", "20s", *EVERY_USER, "--csv", str(prefix), server=default_server, cwd=tmp_path
    )
    assert result.returncode == 0, tail(result.stdout)
    assert "SLO gate passed" in result.stdout
    stats = request_stats(prefix)
    assert ALL_REQUEST_NAMES <= set(stats), sorted(stats)
    for name in ALL_REQUEST_NAMES:
        assert int(stats[name]["Request Count"]) > 0, name
        assert int(stats[name]["Failure Count"]) == 0, (name, tail(result.stdout))
    assert int(stats["Aggregated"]["Failure Count"]) == 0


@pytest.mark.integration
def test_impossible_slo_fails_the_run(default_server, tmp_path):
    result = run_locust(
        "--headless", "-t", "8s", *EVERY_USER, "--slo-p95-ms", "0.1", server=default_server, cwd=tmp_path
    )
    assert result.returncode == SLO_FAILED_EXIT_CODE, tail(result.stdout)
    assert "SLO gate FAILED: p95" in result.stdout


@pytest.mark.integration
def test_step_run_writes_csv_html_and_plot(default_server, tmp_path):
    prefix, html = tmp_path / "step", tmp_path / "step.html"
    result = run_locust(
        "--headless", "--shape", "step", "-u", "4", "--stage-s", "4", "--csv", str(prefix), "--csv-full-history",
        "--html", str(html), "QueryEmbeddingGrpcUser",
        server=default_server, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, tail(result.stdout)
    assert "1 users until 4 s, 2 users until 8 s, 4 users until 12 s" in result.stdout
    for suffix in ("_stats.csv", "_stats_history.csv", "_failures.csv"):
        assert Path(f"{prefix}{suffix}").stat().st_size > 0, suffix
    assert "grpc embed query" in html.read_text()
    plot = Path(f"{prefix}_plot.png")
    with Image.open(plot) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 300

    # The same plot again from the file, after the run: one level per step.
    report = load_module("report")
    levels = report.levels(*report.read_history(Path(f"{prefix}_stats_history.csv")))
    assert [level.users for level in levels] == [1, 2, 4]
    assert all(level.rps > 0 and level.fail_rps == 0 and level.p95_ms is not None for level in levels)
    again = tmp_path / "again.png"
    cli = subprocess.run(
        [sys.executable, str(LOADTEST / "report.py"), f"{prefix}_stats_history.csv", "-o", str(again)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert "peak throughput" in cli.stdout
    with Image.open(again) as image:
        assert image.format == "PNG"


@pytest.mark.integration
def test_distributed_run_with_two_workers(default_server, tmp_path):
    port = str(free_port())
    worker_command = locust_command("--worker", "--master-host", "127.0.0.1", "--master-port", port)
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = []
    try:
        for log in logs:
            with log.open("w") as handle:
                workers.append(
                    subprocess.Popen(
                        worker_command, cwd=tmp_path, env=clean_env(), stdout=handle, stderr=subprocess.STDOUT
                    )
                )
        prefix = tmp_path / "distributed"
        result = run_locust(
            "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", port,
            "--expect-workers", "2", "--expect-workers-max-wait", "60", "--headless", "-t", "10s",
            *EVERY_USER, "--csv", str(prefix),
            server=default_server, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, tail(result.stdout)
        assert "2 workers connected" in result.stdout
        assert "to 2 ready workers" in result.stdout  # the users were shared between both
        stats = request_stats(prefix)
        assert int(stats["Aggregated"]["Request Count"]) > 0
        assert int(stats["Aggregated"]["Failure Count"]) == 0
        for worker, log in zip(workers, logs):
            assert worker.wait(timeout=30) == 0, log.read_text()
            assert "Got quit message from master" in log.read_text()
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
                worker.wait(timeout=30)


@pytest.mark.integration
def test_api_scenarios_pass_against_the_api_port(default_server, tmp_path):
    """/v1/rerank and /v1/embeddings (one query; 32 titles) on `ecomserve serve`'s API port: every answer right, and
    none from embed's response cache (the API users' texts are all new)."""
    prefix = tmp_path / "api"
    hits_before, _ = embed_cache_counts(default_server)
    result = run_locust(
        "--headless", "-t", "10s", *EVERY_API_USER, "--api-url", default_server.api_url, "--csv", str(prefix),
        server=default_server, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, tail(result.stdout)
    assert "SLO gate passed" in result.stdout
    stats = request_stats(prefix)
    assert API_REQUEST_NAMES | {"api models"} <= set(stats), sorted(stats)
    for name in API_REQUEST_NAMES:
        assert int(stats[name]["Request Count"]) > 0, name
        assert int(stats[name]["Failure Count"]) == 0, (name, tail(result.stdout))
    # One GET /v1/models per user, whose first id the user's requests then name.
    assert (stats["api models"]["Request Count"], stats["api models"]["Failure Count"]) == ("3", "0")
    assert embed_cache_counts(default_server)[0] == hits_before


@pytest.mark.integration
def test_api_step_run_with_base64_embeddings(default_server, tmp_path):
    prefix = tmp_path / "api-step"
    result = run_locust(
        "--headless", "--shape", "step", "-u", "2", "--stage-s", "4", "--protocols", "api",
        "--api-url", default_server.api_url, "--api-encoding-format", "base64",
        "--csv", str(prefix), "--csv-full-history", "QueryEmbeddingApiUser",
        server=default_server, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, tail(result.stdout)
    assert "1 users until 4 s, 2 users until 8 s" in result.stdout
    stats = request_stats(prefix)
    assert int(stats["api embed query"]["Request Count"]) > 0
    assert int(stats["Aggregated"]["Failure Count"]) == 0, tail(result.stdout)
    with Image.open(f"{prefix}_plot.png") as image:
        assert image.format == "PNG"


@pytest.fixture
def indexed_catalog(default_server) -> dict[str, str]:
    """The load test's catalog (loadtest/data/catalog.csv, as `ecomserve index build` reads it) as the session server's
    live index; {id: title}."""
    spec = load_spec(ROOT / "export/default.yaml")
    repository = default_server.options.repository
    items = list(read_catalog(CATALOG_CSV))
    build_index(spec, repository, items, index_dir(spec, repository.parent), Console(stderr=True))
    titles = {item.id: item.title for item in items}

    def serves_it() -> bool:
        try:  # another test's index does not hold the last id
            return set(client.similar([items[-1].id], top_k=20).ids) <= set(titles)
        except RequestFailed:
            return False

    with client_for(default_server, "grpc") as client:
        assert wait_for(serves_it, timeout_s=10), "the search models did not load the load test's catalog"
    return titles


def search_cache_counts(server) -> tuple[float, float]:
    """(hits, misses) of the search model's result cache so far."""
    return tuple(metric_total(server, "ecomserve_search_cache_total", result=result) for result in ("hit", "miss"))


@pytest.mark.integration
def test_catalog_scenarios_pass_against_the_indexed_catalog(default_server, indexed_catalog, tmp_path):
    """Catalog search in every mode, with and without a FILTER, and similar for one item and for a history, over
    HTTP, gRPC and the API: every answer right (ids of the catalog that match the filter, min(TOP_K, matching) of
    them, never an input id), none from the search result cache (every query new)."""
    prefix = tmp_path / "catalog"
    hits_before, misses_before = search_cache_counts(default_server)
    result = run_locust(
        "--headless", "-t", "20s", "-u", "6", "-r", "6", "--protocols", "http,grpc,api",
        "--api-url", default_server.api_url, "--search-modes", "dense:1,hybrid:1,lexical:1", "--filter-share", "0.5",
        "--top-k", "10", "--unique-texts", "--csv", str(prefix), *CATALOG_USERS,
        server=default_server, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, tail(result.stdout)
    assert "SLO gate passed" in result.stdout
    stats = request_stats(prefix)
    expected = {f"{protocol} {name}" for protocol in ("http", "grpc", "api") for name in CATALOG_NAMES}
    assert expected <= set(stats), sorted(expected - set(stats))
    for name in expected:
        assert int(stats[name]["Request Count"]) > 0, name
        assert int(stats[name]["Failure Count"]) == 0, (name, tail(result.stdout))
    assert int(stats["Aggregated"]["Failure Count"]) == 0
    searches = sum(int(stats[name]["Request Count"]) for name in expected if " search " in name)
    hits_after, misses_after = search_cache_counts(default_server)
    assert hits_after == hits_before
    assert misses_after - misses_before >= searches


def test_answer_checks_reject_wrong_answers():
    answers = load_module("answers")
    unit = np.eye(2, 384, dtype=np.float32)
    answers.check_embeddings({"EMBEDDING": unit}, texts=2)
    wrong_embeddings = {
        "wrong count": {"EMBEDDING": unit[:1]},
        "not unit norm": {"EMBEDDING": unit * 1.1},
        "NaN": {"EMBEDDING": np.where(unit == 0, np.nan, unit)},
        "empty": {"EMBEDDING": np.zeros((2, 0), np.float32)},
        "missing": {},
    }
    for case, outputs in wrong_embeddings.items():
        with pytest.raises(answers.WrongAnswer):
            answers.check_embeddings(outputs, texts=2)
            pytest.fail(case)

    scores = {"SCORES": np.array([0.5, -0.2, 0.9], np.float32), "ENCODER_SCORES": np.zeros((1, 3), np.float32)}
    answers.check_scores(scores, candidates=3)
    with pytest.raises(answers.WrongAnswer, match=r"SCORES: shape \[3\], expected \[4\]"):
        answers.check_scores(scores, candidates=4)
    with pytest.raises(answers.WrongAnswer, match="not a cosine"):
        answers.check_scores({**scores, "SCORES": np.array([0.5, 3.0, 0.1], np.float32)}, candidates=3)

    labels = ["kitchen", "shoes"]
    verdict = {"LABEL": np.array([b"kitchen"], object), "VOTES": np.array([1, 0]), "SCORES": np.array([0.4, 0.1])}
    answers.check_classification(verdict, labels)
    with pytest.raises(answers.WrongAnswer, match="not one of the 2 labels"):
        answers.check_classification({**verdict, "LABEL": np.array(["toys"], object)}, labels)
    with pytest.raises(answers.WrongAnswer, match="VOTES"):
        answers.check_classification({**verdict, "VOTES": np.array([0, 0])}, labels)


def embeddings_answer(rows: np.ndarray, encoding_format: str = "float", tokens: int = 9) -> dict:
    """A right /v1/embeddings answer for `rows`."""

    def encoded(row):
        return base64.b64encode(row.astype("<f4").tobytes()).decode() if encoding_format == "base64" else row.tolist()

    data = [{"object": "embedding", "index": i, "embedding": encoded(row)} for i, row in enumerate(rows)]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": "m", "usage": usage}


def rerank_answer(scores: dict[int, float]) -> dict:
    """A right /v1/rerank answer: {document index: relevance_score}, highest first."""
    ranked = sorted(scores.items(), key=lambda item: -item[1])
    return {"id": "r1", "results": [{"index": i, "relevance_score": s} for i, s in ranked], "meta": {}}


def test_api_answer_checks_reject_wrong_answers():
    answers = load_module("answers")
    unit = np.eye(3, 384, dtype=np.float32)
    for encoding_format in ("float", "base64"):
        answers.check_api_embeddings(embeddings_answer(unit, encoding_format), texts=3, encoding_format=encoding_format)

    def with_item(position: int, **changes) -> dict:
        answer = embeddings_answer(unit)
        answer["data"][position] = {**answer["data"][position], **changes}
        return answer

    swapped = embeddings_answer(unit)
    swapped["data"][0], swapped["data"][1] = swapped["data"][1], swapped["data"][0]
    wrong_embeddings = {
        "one embedding short": (embeddings_answer(unit[:2]), r"data: 2 embeddings for 3 inputs"),
        "not the inputs' order": (swapped, r"data\[0\]\.index: 1, expected 0"),
        "index missing": (with_item(2, index=None), r"data\[2\]\.index: NoneType"),
        "index a boolean": (with_item(1, index=True), r"data\[1\]\.index: bool"),
        "not an embedding": (with_item(0, object="list"), r"data\[0\]\.object"),
        "not unit norm": (embeddings_answer(unit * 1.1), "norm is off"),
        "NaN": (with_item(1, embedding=[float("nan")] * 384), "NaN"),
        "sizes differ": (with_item(2, embedding=[1.0] + [0.0] * 100), r"sizes \[101, 384\]"),
        "empty embedding": (with_item(0, embedding=[]), r"data\[0\]\.embedding: empty"),
        "numbers as text": (with_item(0, embedding=["1.0"] + ["0"] * 383), "flat list of numbers"),
        "base64 unasked": (embeddings_answer(unit, "base64"), r"data\[0\]\.embedding: str"),
        "no model": ({**embeddings_answer(unit), "model": ""}, "model: empty"),
        "no usage": ({**embeddings_answer(unit), "usage": None}, "usage: NoneType"),
        "fewer tokens than texts": (embeddings_answer(unit, tokens=2), "prompt_tokens: 2 for 3 inputs"),
        "not a list": ({**embeddings_answer(unit), "object": "embedding"}, "object: 'embedding', expected 'list'"),
        "not an object": ([], "body: list, expected a JSON object"),
    }
    for case, (answer, message) in wrong_embeddings.items():
        with pytest.raises(answers.WrongAnswer, match=message):
            answers.check_api_embeddings(answer, texts=3)
            pytest.fail(case)
    in_base64 = embeddings_answer(unit, "base64")
    for case, (embedding, message) in {
        "a list": (unit[0].tolist(), "expected str"),
        "not base64": ("not*base64", "not base64"),
        "not whole float32s": (base64.b64encode(b"\0" * 6).decode(), "6 bytes"),
    }.items():
        answer = {**in_base64, "data": [{**in_base64["data"][0], "embedding": embedding}, *in_base64["data"][1:]]}
        with pytest.raises(answers.WrongAnswer, match=message):
            answers.check_api_embeddings(answer, texts=3, encoding_format="base64")
            pytest.fail(case)
    wrong_total = {**embeddings_answer(unit), "usage": {"prompt_tokens": 9, "total_tokens": 10}}
    with pytest.raises(answers.WrongAnswer, match="total_tokens"):
        answers.check_api_embeddings(wrong_total, texts=3)

    documents = ["red shoes", "blue kettle", "oak desk", "wool scarf"]
    scores = {2: 0.9, 0: 0.4, 3: 0.2, 1: 0.0}
    answers.check_api_rerank(rerank_answer(scores), documents, top_n=4)
    top_two = rerank_answer({2: 0.9, 0: 0.4})
    answers.check_api_rerank(top_two, documents, top_n=2)
    answers.check_api_rerank(rerank_answer(scores), documents, top_n=10)  # top_n beyond the documents: all of them
    with_texts = rerank_answer(scores)
    for result in with_texts["results"]:
        result["document"] = {"text": documents[result["index"]]}
    answers.check_api_rerank(with_texts, documents, top_n=4, return_documents=True)
    with_texts["results"][0]["document"] = {"text": "oak desk (refurbished)"}
    unsorted = rerank_answer(scores)
    unsorted["results"].reverse()
    wrong_rerank = {
        "top_n ignored": (rerank_answer(scores), 2, "4 results, expected 2"),
        "a document missing": (top_two, 4, "2 results, expected 4"),
        "index out of range": (rerank_answer({2: 0.9, 0: 0.4, 4: 0.3, 1: 0.1}), 4, r"results\[2\]\.index: 4, not one"),
        "index twice": ({**top_two, "results": [top_two["results"][0]] * 2}, 2, r"results\[1\]\.index: 2 again"),
        "not sorted": (unsorted, 4, "not sorted by relevance_score"),
        "above 1": (rerank_answer({**scores, 2: 1.7}), 4, r"relevance_score: 1\.7000 is outside \[0, 1\]"),
        "below 0 (a raw cosine)": (rerank_answer({**scores, 1: -0.3}), 4, r"-0\.3000 is outside \[0, 1\]"),
        "NaN": (rerank_answer({**scores, 1: float("nan")}), 4, "NaN"),
        "score as text": (
            {"id": "r1", "results": [{"index": 2, "relevance_score": "0.9"}], "meta": {}},
            1,
            r"results\[0\]\.relevance_score: str",
        ),
        "no id": ({**rerank_answer(scores), "id": ""}, 4, "id: empty"),
        "no meta": ({key: value for key, value in rerank_answer(scores).items() if key != "meta"}, 4, "meta: missing"),
        "document text changed": (with_texts, 4, r"results\[0\]\.document\.text"),
    }
    for case, (answer, top_n, message) in wrong_rerank.items():
        with pytest.raises(answers.WrongAnswer, match=message):
            answers.check_api_rerank(answer, documents, top_n=top_n, return_documents=case == "document text changed")
            pytest.fail(case)

    models = {"object": "list", "data": [{"id": "minilm", "object": "model"}, {"id": "other", "object": "model"}]}
    assert answers.check_api_models(models) == ["minilm", "other"]
    for case, (answer, message) in {
        "none listed": ({"object": "list", "data": []}, "no models listed"),
        "no id": ({"object": "list", "data": [{"object": "model"}]}, r"data\[0\]\.id: missing"),
        "not a model": ({"object": "list", "data": [{"id": "x", "object": "file"}]}, r"data\[0\]\.object"),
    }.items():
        with pytest.raises(answers.WrongAnswer, match=message):
            answers.check_api_models(answer)
            pytest.fail(case)


def test_api_request_bodies_from_the_workload():
    """The API users send the Triton users' texts: a query as /v1/embeddings' input string, titles as its list, the
    query and the candidates as /v1/rerank's documents (top_n all of them); classify has no endpoint."""
    workload = load_module("workload", uses=("answers",))
    api = load_module("api_requests", uses=("answers",))
    answers = load_module("answers")
    settings = workload.WorkloadSettings(candidates=5, recommend_items=32, unique_texts=True)
    draws = workload.Workload(settings, random.Random(7))

    query_call = draws.call("query_embedding")
    query = api.from_call(query_call, "minilm")
    assert (query.name, query.path) == ("embed query", "/v1/embeddings")
    assert query.body == {"input": query_call.inputs[0].texts[0], "model": "minilm", "encoding_format": "float"}
    query.check(embeddings_answer(np.eye(1, 384), tokens=4))
    with pytest.raises(answers.WrongAnswer):
        query.check(embeddings_answer(np.eye(2, 384)))

    items_call = draws.call("recommendation")
    items = api.from_call(items_call, "minilm", "base64")
    assert items.name == "embed items" and items.body["encoding_format"] == "base64"
    assert items.body["input"] == list(items_call.inputs[0].texts) and len(items.body["input"]) == 32
    items.check(embeddings_answer(np.eye(32, 384), "base64", tokens=200))
    with pytest.raises(answers.WrongAnswer):
        items.check(embeddings_answer(np.eye(32, 384), "float", tokens=200))

    search_call = draws.call("search")
    search = api.from_call(search_call, "minilm")
    candidates = list(search_call.inputs[1].texts)
    assert (search.name, search.path) == ("rank search", "/v1/rerank")
    assert search.body == {
        "model": "minilm",
        "query": search_call.inputs[0].texts[0],
        "documents": candidates,
        "top_n": 5,
        "return_documents": False,
    }
    search.check(rerank_answer({i: 0.5 - i / 10 for i in range(5)}))
    with pytest.raises(answers.WrongAnswer):
        search.check(rerank_answer({i: 0.5 - i / 10 for i in range(4)}))

    with pytest.raises(ValueError, match="no endpoint"):
        api.from_call(draws.call("category"), "minilm")
    assert set(api.API_SCENARIOS) == set(workload.SCENARIOS) - {"category"}
    with pytest.raises(ValueError):
        api.embeddings_body([], "minilm")
    with pytest.raises(ValueError):
        api.embeddings_body(["a"], "minilm", "float16")
    with pytest.raises(ValueError):
        api.rerank_body("q", ["a"], "minilm", top_n=0)

    # Unique texts: no two requests alike, so none can be answered from a response cache.
    bodies = [api.from_call(draws.call("query_embedding"), "m").body["input"] for _ in range(200)]
    assert len(set(bodies)) == len(bodies)


def test_catalog_filters_are_valid_and_select_what_the_server_selects():
    """Every FILTER the load mix can send is one ecomserve accepts (no bad FILTER in the mix) and selects, item for
    item, what ecomserve's filter selects from the catalog as `ecomserve index build` reads it: the answer checks
    expect exactly those items."""
    workload = load_module("workload", uses=("answers",))
    catalog = workload.load_catalog(workload.DATA_DIR)
    items = list(read_catalog(CATALOG_CSV))
    assert catalog.titles_by_id == {item.id: item.title for item in items}
    assert {item.brand for item in items} != {None} and {item.in_stock for item in items} == {True, False}
    assert 20 <= len(catalog.filters) <= 32  # search keeps the matching rows of 32 filters
    fields = set()
    for chosen in catalog.filters:
        parsed = parse_filter(chosen.text)  # raises InvalidInput on a bad one
        assert chosen.matching == {item.id for item in items if parsed.matches(item.filter_fields())}, chosen.text
        assert chosen.matching, chosen.text
        fields |= set(json.loads(chosen.text))
    assert fields == {"category", "brand", "price", "in_stock"}
    # Some select fewer items than TOP_K (the answer then holds all of them), most more.
    assert any(len(chosen.matching) < 10 for chosen in catalog.filters)

    # A catalog without brand, price or in_stock still gets filters, on what it has.
    bare = [workload.Item(f"x{i}", f"thing {i}", "a" if i % 2 else "b") for i in range(6)]
    assert [json.loads(f.text) for f in workload.catalog_filters(bare)] == [{"category": "a"}, {"category": "b"}]


def test_catalog_requests_from_the_workload():
    """catalog_search: QUERY (new every time), TOP_K, MODE from the mix, FILTER (one of the catalog's) in about the
    --filter-share; similar: 1 item or 3 to 5 distinct ones of the catalog. Each kind its own request name."""
    workload = load_module("workload", uses=("answers",))
    catalog = workload.load_catalog(workload.DATA_DIR)
    filters = {chosen.text: chosen.matching for chosen in catalog.filters}
    settings = workload.WorkloadSettings(
        unique_texts=True, top_k=7, search_modes="dense:2,hybrid:1,lexical:1", filter_share=0.5
    )
    draws = workload.Workload(settings, random.Random(11))
    names, queries = [], set()
    for _ in range(800):
        call = draws.call("catalog_search")
        inputs = {tensor.name: tensor for tensor in call.inputs}
        assert call.model == "search" and set(inputs) <= {"QUERY", "TOP_K", "FILTER", "MODE"}
        assert (inputs["TOP_K"].datatype, inputs["TOP_K"].values) == ("INT32", (7,))
        (mode,) = inputs["MODE"].texts
        (query,) = inputs["QUERY"].texts
        queries.add(query)
        if "FILTER" in inputs:
            assert call.name == f"search {mode} filtered"
            assert call.hits.matching == filters[inputs["FILTER"].texts[0]]
        else:
            assert call.name == f"search {mode}" and call.hits.matching == catalog.ids
        assert (call.hits.top_k, call.hits.exact, call.hits.cosines) == (7, mode != "lexical", mode == "dense")
        names.append(call.name)
    assert len(queries) == 800
    counts = Counter(names)
    assert set(counts) == {f"search {m}{s}" for m in MODES for s in ("", " filtered")}
    assert 0.4 < sum(n for name, n in counts.items() if "filtered" in name) / 800 < 0.6
    assert 0.4 < sum(n for name, n in counts.items() if "dense" in name) / 800 < 0.6

    kinds = Counter()
    for _ in range(400):
        call = draws.call("similar")
        inputs = {tensor.name: tensor for tensor in call.inputs}
        ids = inputs["ITEM_IDS"].texts
        assert call.model == "similar" and inputs["ITEM_IDS"].shape == (len(ids),)
        assert len(set(ids)) == len(ids) in (1, 3, 4, 5) and set(ids) <= catalog.ids
        assert call.hits.excluded == set(ids) and call.hits.cosines and call.hits.exact
        assert call.name.startswith("similar item" if len(ids) == 1 else "similar history")
        assert call.name.endswith(" filtered") == ("FILTER" in inputs)
        kinds[call.name] += 1
    assert set(kinds) == {f"similar {k}{s}" for k in ("item", "history") for s in ("", " filtered")}

    # The defaults: most catalog searches plain dense.
    default = workload.Workload(workload.WorkloadSettings(), random.Random(5))
    plain = Counter(default.call("catalog_search").name for _ in range(1000))
    assert plain["search dense"] > 500

    assert workload.parse_search_modes("dense:8, hybrid:1,lexical") == {"dense": 8, "hybrid": 1, "lexical": 1}
    assert workload.parse_search_modes("hybrid:1,dense:0") == {"hybrid": 1}
    for bad, message in {
        "fuzzy:1": "unknown mode 'fuzzy'",
        "dense:x": "not a whole number",
        "dense:-1": "negative",
        "dense:0": "no mode",
        "dense,dense:2": "twice",
    }.items():
        with pytest.raises(ValueError, match=message):
            workload.parse_search_modes(bad)


def found_outputs(ids: list[str], scores: list[float] | None = None) -> dict[str, np.ndarray]:
    scores = scores if scores is not None else [0.9 - i / 100 for i in range(len(ids))]
    return {"IDS": np.array([i.encode() for i in ids], dtype=object), "SCORES": np.array(scores, np.float32)}


def test_catalog_answer_checks_reject_wrong_answers():
    answers = load_module("answers")
    catalog = {f"p{i}": f"title {i}" for i in range(12)}
    everything = frozenset(catalog)
    shoes = frozenset({"p1", "p2", "p3"})
    search = answers.Hits(top_k=4, catalog=catalog, matching=everything, cosines=True)
    answers.check_hits(found_outputs(["p5", "p0", "p7", "p1"]), search)
    filtered = answers.Hits(top_k=4, catalog=catalog, matching=shoes)
    answers.check_hits(found_outputs(["p2", "p1", "p3"]), filtered)  # all 3 matching items, fewer than TOP_K
    lexical = answers.Hits(top_k=4, catalog=catalog, matching=shoes, exact=False)
    answers.check_hits(found_outputs(["p2"]), lexical)
    answers.check_hits(found_outputs([]), lexical)  # nothing shares a token with the query
    similar = answers.Hits(top_k=4, catalog=catalog, matching=shoes, excluded=frozenset({"p1"}), cosines=True)
    answers.check_hits(found_outputs(["p3", "p2"]), similar)
    wrong = {
        "more than TOP_K": (found_outputs(["p5", "p0", "p7", "p1", "p2"]), search, "5 results for TOP_K 4"),
        "fewer than TOP_K": (found_outputs(["p5", "p0"]), search, "2 results, expected 4"),
        "not every matching item": (found_outputs(["p2", "p1"]), filtered, r"expected 3 \(TOP_K 4, 3 matching"),
        "not in the catalog": (found_outputs(["p5", "p0", "sku-9", "p1"]), search, r"IDS\[2\]: 'sku-9' is not an item"),
        "outside the filter": (found_outputs(["p2", "p1", "p9"]), filtered, r"'p9' does not match the FILTER"),
        "twice": (found_outputs(["p2", "p1", "p2"]), filtered, r"IDS\[2\]: 'p2' again"),
        "lexical too many": (found_outputs(["p2", "p1", "p3", "p4"]), lexical, "expected at most 3"),
        "an input id": (found_outputs(["p1", "p2"]), similar, r"'p1' is one of the items asked about"),
        "not sorted": (found_outputs(["p3", "p2"], [0.2, 0.5]), similar, "not sorted"),
        "not a cosine": (found_outputs(["p3", "p2"], [3.0, 0.5]), similar, "not a cosine"),
        "NaN": (found_outputs(["p3", "p2"], [float("nan"), 0.5]), similar, "NaN"),
        "scores short": ({**found_outputs(["p3", "p2"]), "SCORES": np.zeros(1, np.float32)}, similar, "1 scores"),
        "no IDS": ({"SCORES": np.zeros(0, np.float32)}, lexical, "IDS: missing"),
    }
    for case, (outputs, hits, message) in wrong.items():
        with pytest.raises(answers.WrongAnswer, match=message):
            answers.check_hits(outputs, hits)
            pytest.fail(case)

    def api_answer(ids: list[str]) -> dict:
        results = [{"id": i, "score": 0.9 - n / 100, "title": catalog.get(i, "?")} for n, i in enumerate(ids)]
        return {"object": "list", "model": "minilm", "results": results}

    answers.check_api_hits(api_answer(["p3", "p2"]), similar)
    retitled = api_answer(["p3", "p2"])
    retitled["results"][1]["title"] = "title 3"
    for case, (answer, message) in {
        "an input id": (api_answer(["p1", "p2"]), r"results\[\]\.id\[0\]: 'p1' is one of the items"),
        "another item's title": (retitled, r"results\[1\]\.title: 'title 3' is not the catalog's title of 'p2'"),
        "score as text": ({**api_answer([]), "results": [{"id": "p3", "score": "1", "title": "title 3"}]}, "str"),
        "no model": ({**api_answer(["p3", "p2"]), "model": ""}, "model: empty"),
    }.items():
        with pytest.raises(answers.WrongAnswer, match=message):
            answers.check_api_hits(answer, similar)
            pytest.fail(case)


def test_api_catalog_bodies_from_the_workload():
    """/v1/search and /v1/similar get the Triton users' inputs as fields: FILTER as the JSON object it is."""
    workload = load_module("workload", uses=("answers",))
    api = load_module("api_requests", uses=("answers",))
    settings = workload.WorkloadSettings(unique_texts=True, top_k=5, search_modes="hybrid", filter_share=1.0)
    draws = workload.Workload(settings, random.Random(2))
    call = draws.call("catalog_search")
    inputs = {tensor.name: tensor.values for tensor in call.inputs}
    search = api.from_call(call, "minilm")
    assert (search.name, search.path) == ("search hybrid filtered", "/v1/search")
    assert search.body == {
        "model": "minilm",
        "query": inputs["QUERY"][0],
        "top_k": 5,
        "filter": json.loads(inputs["FILTER"][0]),
        "mode": "hybrid",
    }
    assert isinstance(search.body["filter"], dict) and search.body["filter"]
    assert json.dumps(search.body)  # plain JSON types only (no numpy scalars)

    call = draws.call("similar")
    similar = api.from_call(call, "minilm")
    ids = list(call.inputs[0].texts)
    assert similar.path == "/v1/similar" and similar.body["ids"] == ids and similar.body["top_k"] == 5
    assert set(similar.body) == {"model", "ids", "top_k", "filter"}
    right = [item for item in sorted(call.hits.matching - set(ids))][:5]
    catalog = call.hits.catalog
    answer = {"object": "list", "model": "m", "results": [{"id": i, "score": 0.5, "title": catalog[i]} for i in right]}
    similar.check(answer)
    answer["results"][0] = {"id": ids[0], "score": 0.5, "title": catalog[ids[0]]}
    with pytest.raises(load_module("answers").WrongAnswer, match="one of the items asked about"):
        similar.check(answer)


def test_api_refusals_and_key():
    api = load_module("api_requests", uses=("answers",))
    assert api.auth_headers({"ECOMSERVE_API_KEY": " k-123 "}) == {"Authorization": "Bearer k-123"}
    assert api.auth_headers({"ECOMSERVE_API_KEY": ""}) == {} == api.auth_headers({})
    assert api.failure_message(429, "queue full", "1", True) == "HTTP 429 overloaded (Retry-After: 1): queue full"
    assert api.failure_message(429, "busy", None, False) == "HTTP 429 overloaded (no Retry-After header): busy"
    assert "$ECOMSERVE_API_KEY is not set" in api.failure_message(401, "missing key", None, False)
    assert "check $ECOMSERVE_API_KEY" in api.failure_message(401, "wrong key", None, True)
    assert api.failure_message(500, "boom", None, True) == "HTTP 500: boom"
    assert api.error_text('{"error": {"message": "too long", "type": "invalid_request_error"}}') == "too long"
    assert api.error_text('{"message": "bad top_n"}') == "bad top_n"
    assert api.error_text('{"error": "queue full"}') == "queue full"
    assert api.error_text('{"detail": "Not Found"}') == "Not Found"
    assert api.error_text("<html>bad gateway</html>") == "<html>bad gateway</html>"
    assert api.error_text(None) == ""


class RecordingApi(BaseHTTPRequestHandler):
    """The API as an overloaded server, for the users' side only: GET /v1/models lists one model, every POST is
    refused with 429 and Retry-After. Records what it is sent."""

    received: list[tuple[str, str, str | None, dict | None]]  # method, path, Authorization, JSON body

    def log_message(self, *_args) -> None:
        pass

    def do_GET(self) -> None:
        self.received.append(("GET", self.path, self.headers.get("Authorization"), None))
        self._answer(200, {"object": "list", "data": [{"id": "listed-model", "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append(("POST", self.path, self.headers.get("Authorization"), body))
        self._answer(429, {"error": {"message": "queue full", "type": "overloaded"}}, {"Retry-After": "1"})

    def _answer(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        content = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(content))}.items():
            self.send_header(name, value)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(content)


@pytest.fixture
def recording_api():
    received: list = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (RecordingApi,), {"received": received}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_api_users_send_the_key_and_new_texts_and_name_overload(recording_api, tmp_path):
    """No ecomserve here: what the API users send (to --api-url, not --host; the key from $ECOMSERVE_API_KEY; the
    listed model; new texts every request) and how a 429 shows in the report."""
    url, received = recording_api
    key = "test-key-4f1d"
    prefix = tmp_path / "refused"
    command = locust_command(
        "--headless", "-t", "3s", *EVERY_API_USER, "--candidates", "5", "--think-time-ms", "50",
        "--api-url", url, "--host", f"http://127.0.0.1:{free_port()}", "--csv", str(prefix),
    )  # fmt: skip
    result = subprocess.run(
        command,
        cwd=tmp_path,
        env={**clean_env(), API_KEY_ENV: key},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    assert result.returncode == SLO_FAILED_EXIT_CODE, tail(result.stdout)
    assert "SLO gate FAILED: failure ratio" in result.stdout
    assert key not in result.stdout
    with Path(f"{prefix}_failures.csv").open(newline="") as handle:
        failures = {row["Name"]: row["Error"] for row in csv.DictReader(handle)}
    assert set(failures) == API_REQUEST_NAMES, failures
    assert all("HTTP 429 overloaded (Retry-After: 1): queue full" in error for error in failures.values()), failures
    stats = request_stats(prefix)
    assert (stats["api models"]["Request Count"], stats["api models"]["Failure Count"]) == ("3", "0")

    assert {authorization for _, _, authorization, _ in received} == {f"Bearer {key}"}
    assert [path for method, path, _, _ in received if method == "GET"] == ["/v1/models"] * 3
    posts = [(path, body) for method, path, _, body in received if method == "POST"]
    assert {body["model"] for _, body in posts} == {"listed-model"}
    embeddings = [body for path, body in posts if path == "/v1/embeddings"]
    reranks = [body for path, body in posts if path == "/v1/rerank"]
    assert len(embeddings) + len(reranks) == len(posts)
    queries = [body["input"] for body in embeddings if isinstance(body["input"], str)]
    items = [body["input"] for body in embeddings if isinstance(body["input"], list)]
    assert queries and items and reranks
    assert {len(texts) for texts in items} == {32}
    assert {body["encoding_format"] for body in embeddings} == {"float"}
    assert all(len(body["documents"]) == body["top_n"] == 5 and not body["return_documents"] for body in reranks)
    # New texts every request (a catalogue-style number appended), so no answer can come from a response cache.
    keys = [json.dumps(body["input"]) for body in embeddings] + [
        json.dumps([body["query"], body["documents"]]) for body in reranks
    ]
    assert len(set(keys)) == len(keys)
    texts = queries + [text for batch in items for text in batch]
    texts += [text for body in reranks for text in (body["query"], *body["documents"])]
    assert all(text.rsplit(" ", 1)[-1].isdigit() for text in texts)


def test_triton_users_send_the_key_too(recording_api, tmp_path):
    """A server with an API key wants it on Triton's ports as well: over HTTP as the header, over gRPC as metadata."""
    url, received = recording_api
    metadata: list[str | None] = []

    def refuse(_request, context):
        metadata.append(dict(context.invocation_metadata()).get("authorization"))
        context.abort(grpc.StatusCode.UNAVAILABLE, "recorded")

    class Recorder(grpc.GenericRpcHandler):
        def service(self, _details):
            return grpc.unary_unary_rpc_method_handler(refuse)

    grpc_server = grpc.server(ThreadPoolExecutor(4), handlers=[Recorder()])
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        command = locust_command(
            "--headless", "-t", "2s", "-u", "2", "-r", "2", "--think-time-ms", "100",
            "--host", url, "--grpc-host", f"127.0.0.1:{grpc_port}", "QueryEmbeddingHttpUser", "QueryEmbeddingGrpcUser",
        )  # fmt: skip
        result = subprocess.run(
            command,
            cwd=tmp_path,
            env={**clean_env(), API_KEY_ENV: "test-key-c0de"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
        )
    finally:
        grpc_server.stop(grace=None)
    assert result.returncode == SLO_FAILED_EXIT_CODE, tail(result.stdout)
    assert "StatusCode.UNAVAILABLE: recorded" in result.stdout
    assert {(path, authorization) for _, path, authorization, _ in received} == {
        ("/v2/models/embed/infer", "Bearer test-key-c0de")
    }
    assert metadata and set(metadata) == {"Bearer test-key-c0de"}


def test_options_are_checked(tmp_path):
    def refused(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            locust_command("--headless", "-t", "1s", *args),
            cwd=tmp_path,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
        )

    bad_url = refused("--protocols", "api", "--api-url", "127.0.0.1:8080")
    assert bad_url.returncode == OPTION_REFUSED_EXIT_CODE, tail(bad_url.stdout)
    assert "--api-url '127.0.0.1:8080': expected a base URL" in bad_url.stdout
    # API classes named, but --protocols left at http,grpc.
    not_selected = refused("QueryEmbeddingApiUser")
    assert not_selected.returncode == OPTION_REFUSED_EXIT_CODE, tail(not_selected.stdout)
    assert "the api users need api in it" in not_selected.stdout
    for args, message in {
        ("--search-modes", "dense:8,fuzzy:1"): "--search-modes 'dense:8,fuzzy:1': unknown mode 'fuzzy'",
        ("--filter-share", "1.5"): "--filter-share 1.5: expected a share from 0 to 1",
        ("--top-k", "0"): "--top-k must be at least 1",
    }.items():
        bad = refused(*args)
        assert bad.returncode == OPTION_REFUSED_EXIT_CODE, tail(bad.stdout)
        assert message in bad.stdout, tail(bad.stdout)


def test_stage_tables():
    stages = load_module("stages")
    step = stages.step(64, 15)
    assert [s.users for s in step] == [1, 2, 4, 8, 16, 32, 64]
    assert [s.until_s for s in step] == [15 * i for i in range(1, 8)]  # cumulative end times
    assert [s.users for s in stages.step(6, 5)] == [1, 2, 4, 6]
    assert [s.users for s in stages.spike(48, 10)] == [6, 48, 6]
    soak = stages.soak(16, 15, 600)
    assert soak[-1].until_s == 615 and soak[0].spawn_rate == pytest.approx(16 / 15)
    assert stages.stage_at(step, 0).users == 1
    assert stages.stage_at(step, 15).users == 2
    assert stages.stage_at(step, 105) is None  # tick() returns None: the test stops
    for bad in (("wave", 4, 1, 1), ("step", 0, 1, 1), ("soak", 4, 1, 0)):
        with pytest.raises(ValueError):
            stages.build(*bad)


def test_slo_violations():
    slo = load_module("slo")
    limits = slo.Slo(p95_ms=100, p99_ms=200, fail_ratio=0.01)
    assert slo.violations(limits, slo.Totals(requests=1000, failures=10, p95_ms=100, p99_ms=200)) == []
    broken = slo.violations(limits, slo.Totals(requests=1000, failures=11, p95_ms=101, p99_ms=250))
    assert [problem.split()[0] for problem in broken] == ["p95", "p99", "failure"]
    assert slo.violations(slo.Slo(), slo.Totals(requests=0, failures=0, p95_ms=0, p99_ms=0)) == [
        "no requests were made"
    ]
    assert slo.violations(slo.Slo(), slo.Totals(requests=5, failures=0, p95_ms=9, p99_ms=9, exceptions=1))


def k8s_documents() -> dict[tuple[str, str], dict]:
    documents = {}
    for path in sorted((LOADTEST / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            documents[(document["kind"], document.get("metadata", {}).get("name", path.stem))] = document
    return documents


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def test_k8s_manifests_structure():
    documents = k8s_documents()
    master, workers = documents[("Deployment", "locust-master")], documents[("Deployment", "locust-worker")]
    service = documents[("Service", "locust-master")]
    kustomization = documents[("Kustomization", "kustomization")]
    assert set(kustomization["resources"]) == {"locust-master.yaml", "locust-worker.yaml"}
    assert all((LOADTEST / "k8s" / resource).is_file() for resource in kustomization["resources"])

    for deployment in (master, workers):
        assert deployment["apiVersion"] == "apps/v1"
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert master["spec"]["replicas"] == 1 and workers["spec"]["replicas"] >= 2

    # The Service picks the master's pods only, and names ports the master's container has.
    assert service["spec"]["selector"].items() <= master["spec"]["template"]["metadata"]["labels"].items()
    assert not service["spec"]["selector"].items() <= workers["spec"]["template"]["metadata"]["labels"].items()
    master_ports = {port["name"]: port["containerPort"] for port in container(master)["ports"]}
    service_ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert {port["targetPort"] for port in service_ports.values()} <= set(master_ports)
    assert master_ports["web"] == 8089

    # Workers find the master through the Service, on the port the master binds.
    master_args, worker_args = container(master)["args"], container(workers)["args"]
    assert "--master" in master_args and "--worker" in worker_args
    assert f"--master-bind-port={master_ports['master']}" in master_args
    assert f"--master-host={service['metadata']['name']}" in worker_args
    assert f"--master-port={service_ports['master']['port']}" in worker_args

    # The master targets the ecomserve Service over both protocols; the workers get it from the master.
    env = {item["name"]: item["value"] for item in container(master)["env"]}
    assert env["LOCUST_HOST"] == "http://ecomserve:8000" and env["LOCUST_GRPC_HOST"] == "ecomserve:8001"

    # One placeholder image, documented, and the one the kustomization rewrites.
    image = container(master)["image"]
    assert container(workers)["image"] == image
    assert image.rsplit(":", 1)[0] == kustomization["images"][0]["name"]
    assert image in (LOADTEST / "README.md").read_text()
    assert image in (LOADTEST / "Dockerfile").read_text()
