"""`ecomserve bench --peer KIND=VENV` (issue 18): the unique-text generator, --peer validation, the Infinity
command line, the fastembed worker's JSON contract, the ratios and the report.

The peers are never ecomserve dependencies: the tests that run them need their venvs (scripts/setup_peers.sh;
found at $ECOMSERVE_PEER_INFINITY / $ECOMSERVE_PEER_FASTEMBED, else /work/peers/KIND) and are skipped with a
reason when a venv is absent."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from ecomserve import cli
from ecomserve.bench import fastembed_worker, peers
from ecomserve.bench.load import ROUNDS, Measurement
from ecomserve.bench.report import write_report
from ecomserve.bench.run import PEER_POINTS, _in_turns, peer_checks
from ecomserve.bench.texts import QUERY_TOKENS, UniqueTexts
from ecomserve.evaluation import load_eval_set
from ecomserve.paths import corpus_texts, parity_texts, typed_eval_set_text
from ecomserve.spec import resolve_source
from ecomserve.tokenization import TOKENIZER_FILE, TextTokenizer

ROOT = Path(__file__).resolve().parents[1]
SOURCE = resolve_source("bundled:all-MiniLM-L6-v2", ROOT / "export")


def _peer_venv(kind: str) -> Path | None:
    venv = Path(os.environ.get(f"ECOMSERVE_PEER_{kind.upper()}", f"/work/peers/{kind}"))
    try:
        return peers.parse_peer(f"{kind}={venv}").venv
    except peers.PeerError:
        return None


def _needs(kind: str) -> Path:
    venv = _peer_venv(kind)
    if venv is None:
        pytest.skip(f"no {kind} venv: {peers.SETUP_SCRIPT} {kind} VENV, then ECOMSERVE_PEER_{kind.upper()}=VENV")
    return venv


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(SOURCE / TOKENIZER_FILE, 128)


def _tokens(tokenizer: TextTokenizer, texts: list[str]) -> list[int]:
    return [int(n) for n in tokenizer.encode(texts).attention_mask.sum(axis=1)]


def _shipped_texts() -> set[str]:
    eval_set = load_eval_set()
    typed = json.loads(typed_eval_set_text())
    typed_texts = {p["title"] for p in typed.get("products", [])} | {q["text"] for q in typed.get("queries", [])}
    return (
        set(eval_set.titles) | {q.text for q in eval_set.queries} | set(corpus_texts()) | set(parity_texts())
    ) | typed_texts


# ---- unique texts ----------------------------------------------------------------------------------------


def test_unique_queries_are_deterministic_distinct_short_and_new(tokenizer):
    first, second = UniqueTexts(tokenizer), UniqueTexts(tokenizer)
    queries = [first.query(n) for n in range(60_000)]
    assert queries == [second.query(n) for n in range(60_000)]
    assert len(set(queries)) == len(queries)
    low, high = QUERY_TOKENS
    # Every base query with every addition, at the largest number the first 60 000 reach, and a spread sample.
    sample = queries[-len(first.base_queries) * 7 :] + queries[::37]
    counts = _tokens(tokenizer, sample)
    assert low <= min(counts) and max(counts) <= high
    assert not set(queries) & _shipped_texts()


def test_unique_titles_are_deterministic_distinct_and_new(tokenizer):
    texts, again = UniqueTexts(tokenizer), UniqueTexts(tokenizer)
    titles = [texts.title(n) for n in range(40_000)]
    assert titles == [again.title(n) for n in range(40_000)]
    assert len(set(titles)) == len(titles)
    assert not set(titles) & _shipped_texts()
    assert max(_tokens(tokenizer, titles[::97])) < 128  # never truncated: the addition stays in the text


def test_the_streams_never_repeat_across_threads(tokenizer):
    texts = UniqueTexts(tokenizer)
    drawn: list[str] = []
    lock = threading.Lock()

    def draw() -> None:
        mine = [texts.next_query() for _ in range(300)] + texts.next_titles(32) * 1
        with lock:
            drawn.extend(mine)

    threads = [threading.Thread(target=draw) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    drawn += texts.take_queries(100) + texts.next_titles(100)
    assert len(drawn) == len(set(drawn)) == 8 * 332 + 200
    # The set drawn is the stream's head, whichever thread drew what.
    assert set(texts.query(n) for n in range(8 * 300 + 100)) <= set(drawn)


# ---- --peer ----------------------------------------------------------------------------------------------


def _fake_venv(root: Path, kind: str) -> Path:
    """A folder laid out like the peer's venv (the executable the check looks for), for the validation only."""
    venv = root / kind
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / ("infinity_emb" if kind == "infinity" else "python")).write_text("")
    return venv


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("infinity", "expected KIND=VENV"),
        ("infinity=", "expected KIND=VENV"),
        ("vllm=/tmp", "unknown peer kind 'vllm'; known: infinity, fastembed"),
    ],
)
def test_peer_values_that_cannot_work(value, message):
    with pytest.raises(peers.PeerError, match=message):
        peers.parse_peer(value)


def test_a_missing_venv_says_what_to_run(tmp_path):
    with pytest.raises(peers.PeerError, match=r"no virtual environment .* `scripts/setup_peers.sh infinity"):
        peers.parse_peer(f"infinity={tmp_path / 'absent'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        peers.PeerError, match=r"bin/python is missing; create it with `scripts/setup_peers.sh fastembed"
    ):
        peers.parse_peer(f"fastembed={tmp_path / 'empty'}")


def test_valid_peers_and_one_of_each_kind(tmp_path):
    infinity, fastembed = _fake_venv(tmp_path, "infinity"), _fake_venv(tmp_path, "fastembed")
    found = peers.parse_peers([f"Infinity={infinity}", f"fastembed={fastembed}"])
    assert [(p.kind, p.venv) for p in found] == [("infinity", infinity), ("fastembed", fastembed)]
    with pytest.raises(peers.PeerError, match="repeated: infinity"):
        peers.parse_peers([f"infinity={infinity}", f"infinity={infinity}"])


def test_the_cli_refuses_bad_peers(tmp_path):
    with pytest.raises(Exception, match="unknown peer kind"):
        cli.run(["bench", "--workload", "peers", "--peer", "vllm=/tmp", "--out", str(tmp_path)])
    with pytest.raises(Exception, match="setup_peers.sh"):
        cli.run(["bench", "--workload", "peers", "--peer", f"fastembed={tmp_path / 'no'}", "--out", str(tmp_path)])
    with pytest.raises(Exception, match="at least one --peer"):
        cli.run(["bench", "--workload", "peers", "--out", str(tmp_path)])
    with pytest.raises(Exception, match="--workload serving or peers"):
        cli.run(["bench", "--workload", "front", "--peer", f"fastembed={tmp_path}", "--out", str(tmp_path)])


# ---- Infinity's command line -----------------------------------------------------------------------------


def test_infinity_optimum_runs_from_inside_its_onnx_folder_on_loopback_offline(tmp_path):
    peer = peers.Peer("infinity", tmp_path / "venv")
    folder = tmp_path / "onnx" / "fp32"
    launch = peers.infinity_launch(peer, "optimum fp32", 41234, folder, SOURCE, tmp_path / "hf_home")
    command = launch.command
    assert command[:2] == [str(tmp_path / "venv" / "bin" / "infinity_emb"), "v2"]

    def option(name: str) -> str:
        return command[command.index(name) + 1]

    assert option("--engine") == "optimum" and option("--model-id") == "."
    assert launch.cwd == folder.absolute()
    assert option("--host") == "127.0.0.1" and option("--port") == "41234" == str(launch.port)
    assert option("--pooling-method") == "mean" and option("--device") == "cpu"
    assert "--onnx-disable-optimize" not in command  # the plain export: Infinity's own optimisation runs
    assert launch.env["HF_HUB_OFFLINE"] == "1" and launch.env["TRANSFORMERS_OFFLINE"] == "1"
    assert launch.env["HF_HOME"] == str((tmp_path / "hf_home").absolute())
    assert launch.env["INFINITY_ANONYMOUS_USAGE_STATS"] == "0"
    assert "VIRTUAL_ENV" not in launch.env


def test_infinity_prepared_files_skip_its_optimisation_and_torch_loads_the_bundled_folder(tmp_path):
    peer = peers.Peer("infinity", tmp_path / "venv")
    int8 = peers.infinity_launch(peer, "optimum int8 dynamic", 1, tmp_path / "int8", SOURCE, tmp_path / "hf")
    assert "--onnx-disable-optimize" in int8.command and int8.cwd == (tmp_path / "int8").absolute()
    torch = peers.infinity_launch(peer, "torch fp32", 2, None, SOURCE, tmp_path / "hf")
    assert torch.command[torch.command.index("--model-id") + 1] == str(SOURCE)
    assert torch.command[torch.command.index("--engine") + 1] == "torch"
    with pytest.raises(peers.PeerError, match="unknown Infinity configuration"):
        peers.infinity_launch(peer, "ctranslate2", 3, None, SOURCE, tmp_path / "hf")
    with pytest.raises(peers.PeerError, match="needs its ONNX folder"):
        peers.infinity_launch(peer, "optimum fp32", 3, None, SOURCE, tmp_path / "hf")


# ---- the fastembed worker's contract ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_embed():
    """The bundled model through sentence-transformers (fp32): a real embedder for the worker's loop."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(SOURCE), device="cpu")
    return lambda texts: list(model.encode(texts, batch_size=32, normalize_embeddings=True))


def _request(tmp_path: Path, queries: int, titles: int, tokenizer) -> dict:
    texts = UniqueTexts(tokenizer)
    return peers.fastembed_request(
        tmp_path,
        "tiny",
        texts.take_queries(queries),
        texts.next_titles(titles),
        parity_texts()[:3],
        0.2,
        dim=384,  # the request's field only: this worker is never run
        threads=(1,),
    )


def test_the_worker_measures_each_workload_and_returns_its_json(tmp_path, reference_embed, tokenizer):
    request = json.loads(json.dumps(_request(tmp_path, 2000, 4000, tokenizer)))  # as the worker reads it
    result = json.loads(json.dumps(fastembed_worker.serve(request, {1: reference_embed}, {"fastembed": "x"})))
    assert set(result) == {"versions", "measurements", "exhausted", "parity_vectors"}
    rows = result["measurements"]
    assert [(r["contender"], r["workload"], r["items_per_request"]) for r in rows] == [
        ("fastembed tiny (1 thread)", "query embed", 1),
        ("fastembed tiny (1 thread)", "batch embed 32", 32),
    ]
    for row in rows:
        measurement = peers.measurement_from_row(row)  # the same fields as every other contender's rows
        assert {f.name for f in fields(Measurement)} <= set(row)
        assert measurement.protocol == "in-process" and measurement.concurrency == 1
        assert measurement.requests > 0 and measurement.errors == 0
    assert result["exhausted"] == {"query embed": False, "batch embed 32": False}
    assert np.array(result["parity_vectors"]).shape == (3, 384)


def test_the_worker_never_reuses_a_text_and_says_when_they_ran_out(tmp_path, reference_embed, tokenizer):
    # 3 warm-up calls each, then 5 queries and no title batch (8 titles left) before the texts run out.
    request = _request(tmp_path, 3 + 5, 3 * 32 + 8, tokenizer) | {"duration_s": 1.0}
    seen: list[str] = []

    def embed(texts: list[str]):
        seen.extend(texts)
        return reference_embed(texts)

    result = fastembed_worker.serve(request, {1: embed}, {})
    assert result["exhausted"] == {"query embed": True, "batch embed 32": True}
    by_workload = {r["workload"]: r for r in result["measurements"]}
    assert by_workload["query embed"]["requests"] == 5 and by_workload["query embed"]["errors"] > 0
    assert by_workload["batch embed 32"]["requests"] == 0 and by_workload["batch embed 32"]["errors"] > 0
    measured = seen[: -len(request["parity_texts"])]
    assert len(measured) == 3 + 5 + 3 * 32 and len(set(measured)) == len(measured)


def test_fastembed_needs_enough_texts_for_every_thread_setting():
    assert peers.fastembed_texts_needed(5, 2) >= 2 * 6 * 1000


# ---- ratios and report -----------------------------------------------------------------------------------


def _row(contender: str, workload: str, protocol: str, clients: int, rate: float, p50: float) -> dict:
    items = 1 if workload == "query embed" else 32
    return Measurement(
        contender, workload, protocol, clients, 10, items, 1.0, rate / items, rate, p50, p50, p50, 0
    ).row()


def _peer_rows() -> list[dict]:
    rows = []
    for workload, clients in PEER_POINTS.items():
        for c in clients:
            rows += [_row("ecomserve served", workload, p, c, 100.0 * c, 10.0) for p in ("grpc", "http")]
            rows += [_row("infinity optimum fp32", workload, "http", c, 50.0 * c, 20.0)]
            rows += [_row("infinity torch fp32", workload, "http", c, 25.0 * c, 40.0)]
        # measured in turns with each other, as the bench does when fastembed is a peer
        rows += [_row("ecomserve in-process (1 thread)", workload, "in-process", 1, 300.0, 3.0) | {"turns": ROUNDS}]
        rows += [_row("fastembed int8 (1 thread)", workload, "in-process", 1, 200.0, 5.0) | {"turns": ROUNDS}]
    return rows


def _infinity_info(optimum_cosine: float) -> dict:
    """Infinity's two configurations of `_peer_rows` with their parity: optimum's as given, torch's passing."""
    cosines = {"optimum fp32": optimum_cosine, "torch fp32": 0.999}
    return {"engines": {name: {"parity": {"min_cosine": c, "ok": c >= 0.99}} for name, c in cosines.items()}}


def test_the_ratios_take_each_peers_best_configuration():
    info = {"infinity": _infinity_info(0.999), "fastembed": {"parity": {"min_cosine": 1.0, "ok": True}}}
    checks = peer_checks(_peer_rows(), info)
    assert checks["query_c16_grpc_vs_infinity"] == pytest.approx(1600 / 800)
    assert checks["batch32_c4_http_vs_infinity"] == pytest.approx(400 / 200)
    assert checks["query_c1_p50_grpc_vs_infinity"] == pytest.approx(10 / 20)
    assert checks["query_c16_grpc_vs_fastembed"] == pytest.approx(1600 / 200)
    assert checks["batch32_in_process_vs_fastembed"] == pytest.approx(300 / 200)
    assert checks["infinity_optimum fp32_parity_min_cosine"] == 0.999


def test_the_main_ratios_against_infinity_come_from_the_rows_measured_in_turns():
    info = {"infinity": _infinity_info(0.999)}
    in_turns = [
        _row("ecomserve served (in turns)", "query embed", "grpc", 16, 900.0, 10.0) | {"turns": ROUNDS},
        _row("ecomserve served (in turns)", "query embed", "http", 16, 1000.0, 10.0) | {"turns": ROUNDS},
        _row("infinity optimum fp32 (in turns)", "query embed", "http", 16, 600.0, 20.0) | {"turns": ROUNDS},
    ]
    checks = peer_checks(_peer_rows() + in_turns, info)
    assert checks["query_c16_grpc_vs_infinity"] == pytest.approx(900 / 600)
    assert checks["query_c16_http_vs_infinity"] == pytest.approx(1000 / 600)
    assert checks["query_c1_p50_grpc_vs_infinity"] == pytest.approx(10 / 20)  # 1 client: not in turns
    assert checks["batch32_c4_grpc_vs_infinity"] == pytest.approx(400 / 200)  # no turns for titles here


def test_contenders_in_turns_alternate_and_merge_their_rounds(tokenizer):
    """Each contender measured ROUNDS times, the order reversed every round, on texts never sent before; one row
    each with every round's requests."""
    order: list[str] = []
    sent: list[str] = []

    def contender(name: str):
        def make_embed(_worker: int):
            def embed(texts: list[str]) -> None:
                if not order or order[-1] != name:
                    order.append(name)
                sent.extend(texts)

            return embed

        return name, "http", make_embed

    rows = _in_turns({"a": contender("a"), "b": contender("b")}, "query embed", 2, UniqueTexts(tokenizer), 0.05)
    # a b | b a | a b | b a: the second of each round goes first in the next (same order throughout: a b a b ...)
    assert ROUNDS == 4 and order == ["a", "b", "a", "b", "a"]
    assert [r["contender"] for r in rows] == ["a (in turns)", "b (in turns)"]
    assert all(r["turns"] == ROUNDS and r["requests"] > 0 and r["errors"] == 0 for r in rows)
    assert len(set(sent)) == len(sent)


def test_a_configuration_that_fails_parity_is_left_out_of_the_ratios():
    info = {"infinity": _infinity_info(0.9)}
    checks = peer_checks(_peer_rows(), info)
    assert checks["query_c16_grpc_vs_infinity"] == pytest.approx(1600 / 400)  # torch's, not optimum's 800


def test_an_int8_peer_passes_parity_when_no_worse_than_ecomserves_own_int8():
    reference = np.eye(3, 4, dtype=np.float32)
    vectors = reference + np.float32(0.15) * np.eye(3, 4, k=1, dtype=np.float32)  # cosine ~0.989
    assert not peers.parity(vectors, reference, "r")["ok"]
    assert peers.parity(vectors, reference, "r", served_min=0.98)["ok"]
    assert not peers.parity(vectors, reference, "r", served_min=0.995)["ok"]


def test_a_peers_only_report(tmp_path):
    results = {
        "cpu": "test CPU",
        "load_average_before": [0.5, 0.5, 0.5],
        "variants": [],
        "tuning": [],
        "measurements": _peer_rows(),
        "served_variant": "int8 static onnxruntime",
        "peers": {
            "infinity": {
                "how": "served over HTTP",
                "engines": {
                    "optimum fp32": {
                        "parity": {"min_cosine": 1.0, "reference": "pytorch fp32", "ok": True},
                        "rss_mb": 900.0,
                    },
                    "torch fp32": {"error": "RuntimeError: it did not start"},
                },
            },
            "fastembed": {
                "how": "in-process",
                "model_file": "x/model.onnx",
                "exhausted": {"query embed": False},
                "parity": {"min_cosine": 1.0, "reference": "same file", "ok": True},
            },
        },
        "checks": {"query_c16_grpc_vs_infinity": 2.0},
    }
    write_report(results, tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "| infinity | torch fp32 |" in summary and "failed: RuntimeError" in summary
    assert "| fastembed int8 (1 thread) | query embed | in-process |" in summary
    assert (tmp_path / "throughput.png").stat().st_size > 0 and not (tmp_path / "pareto.png").exists()


# ---- the real peers (skipped without their venvs) --------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory) -> Path:
    """ecomserve's fp32 ONNX of the bundled model (pooled, normalised), built by the export pipeline."""
    _needs("fastembed")
    from ecomserve.bench.variants import build_variant
    from ecomserve.spec import load_spec

    base = load_spec(ROOT / "export/default.yaml").encoders[0]
    path, _checks = build_variant("fp32 onnxruntime", base, SOURCE, tmp_path_factory.mktemp("fp32"))
    return path


def test_fastembed_runs_ecomserves_onnx_in_its_own_venv(tmp_path, fp32_model, tokenizer):
    venv = _needs("fastembed")
    from ecomserve.runtime import load_runner, run_by_length

    folder = peers.prepare_fastembed_folder(fp32_model, SOURCE, tmp_path / "model")
    texts = UniqueTexts(tokenizer)
    checks_texts = parity_texts()[:8]
    runner = load_runner("onnxruntime", fp32_model, threads=1)
    batch = tokenizer.encode(checks_texts)
    expected = run_by_length(runner, batch.input_ids, batch.attention_mask)
    request = peers.fastembed_request(
        folder, "fp32", texts.take_queries(3000), texts.next_titles(6000), checks_texts, 0.3, expected.shape[1], (1,)
    )
    result = peers.run_fastembed(peers.Peer("fastembed", venv), request, tmp_path / "work")
    assert result["versions"]["fastembed"].startswith("0.")
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in result["measurements"])
    found = peers.parity(np.array(result["parity_vectors"]), expected, "same file")
    assert found["ok"], found


def test_infinity_serves_the_bundled_model_on_loopback(tmp_path):
    venv = _needs("infinity")
    from sentence_transformers import SentenceTransformer

    from ecomserve.server.process import free_port

    peer = peers.Peer("infinity", venv)
    folders = peers.prepare_infinity_folders(peer, SOURCE, tmp_path / "onnx", peers.peer_versions(peer))
    launch = peers.infinity_launch(peer, "optimum int8 dynamic", free_port(), folders["int8"], SOURCE, tmp_path / "hf")
    texts = parity_texts()[:8]
    with peers.InfinityServer(launch, tmp_path / "infinity.log") as server:
        embed = peers.infinity_embedder(launch.port)
        vectors = embed(texts)
        embed.close()
        assert server.process is not None and server.process.poll() is None
    assert server.process is None
    reference = SentenceTransformer(str(SOURCE), device="cpu").encode(texts, normalize_embeddings=True)
    assert peers.parity(vectors, reference, "pytorch fp32")["ok"]
