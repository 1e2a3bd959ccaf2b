"""The Locust load test, run for real: locust as a subprocess, headless and bounded in time, against the session's
tritonserver on loopback (HTTP and gRPC). Also the load test's plain parts (answer checks, stage tables, SLO
arithmetic) and the structure of its Kubernetes manifests.

Locust is never imported here: it monkey-patches the standard library of the process that imports it."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ecomserve.server.process import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
LOADTEST = ROOT / "loadtest"
LOCUSTFILE = LOADTEST / "locustfile.py"
SCENARIO_NAMES = ["rank search", "embed query", "embed items", "classify category"]
ALL_REQUEST_NAMES = {f"{protocol} {name}" for protocol in ("http", "grpc") for name in SCENARIO_NAMES}
# One user per class with -u 8: every scenario over both protocols. Small requests keep 2 cores responsive.
EVERY_USER = ["-u", "8", "-r", "8", "--candidates", "8", "--recommend-items", "32"] + [
    arg for flag in ("search", "query-embedding", "recommendation", "category") for arg in (f"--weight-{flag}", "1")
]
SLO_FAILED_EXIT_CODE = 3


def load_module(name: str):
    """One of loadtest/'s plain modules (no Locust inside), under a name that cannot shadow anything."""
    qualified = f"loadtest_{name}"
    if qualified not in sys.modules:
        spec = importlib.util.spec_from_file_location(qualified, LOADTEST / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[qualified]


def locust_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *args]


def clean_env() -> dict[str, str]:
    """No LOCUST_* settings from the calling shell: the tests pass every option they mean."""
    return {key: value for key, value in os.environ.items() if not key.startswith("LOCUST_")}


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


def test_impossible_slo_fails_the_run(default_server, tmp_path):
    result = run_locust(
        "--headless", "-t", "8s", *EVERY_USER, "--slo-p95-ms", "0.1", server=default_server, cwd=tmp_path
    )
    assert result.returncode == SLO_FAILED_EXIT_CODE, tail(result.stdout)
    assert "SLO gate FAILED: p95" in result.stdout


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
