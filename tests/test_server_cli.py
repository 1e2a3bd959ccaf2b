"""Starting and stopping the real server, its error messages, and the `ecomserve` command line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import make_tiny_bert, spec_from

from ecomserve.errors import RepositoryError, ServerError
from ecomserve.server.process import Ports, ServerOptions, TritonServer, free_port

pytestmark = pytest.mark.integration

ECOMSERVE = [sys.executable, "-m", "ecomserve"]


@pytest.fixture(scope="module")
def tiny_repository(tmp_path_factory) -> Path:
    from ecomserve.repository.builder import build_repository

    root = tmp_path_factory.mktemp("cli")
    source = make_tiny_bert(root / "tiny", seed=3)
    repository = root / "model_repository"
    build_repository(spec_from({"encoders": [{"name": "tiny", "source": str(source), "max_seq_len": 32}]}), repository)
    return repository


def free_ports() -> Ports:
    return Ports(free_port(), free_port(), free_port())


def test_busy_port_is_reported_before_starting(tiny_repository, tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        ports = Ports(http=free_port(), grpc=busy, metrics=free_port())
        server = TritonServer(ServerOptions(tiny_repository, ports=ports, work_dir=tmp_path))
        with pytest.raises(ServerError, match=f"grpc port {busy} on 127.0.0.1 is in use.*--grpc-port"):
            server.start()


def test_missing_repository(tmp_path):
    server = TritonServer(ServerOptions(tmp_path / "absent", ports=free_ports(), work_dir=tmp_path))
    with pytest.raises(RepositoryError, match="not found: run `ecomserve build` first"):
        server.start()


def test_invalid_repository_shows_the_relevant_log_lines(tmp_path):
    repository = tmp_path / "repo"
    (repository / "broken" / "1").mkdir(parents=True)
    (repository / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size: oops\n')
    server = TritonServer(ServerOptions(repository, ports=free_ports(), work_dir=tmp_path))
    with pytest.raises(ServerError) as error:
        server.start(timeout_s=120)
    message = str(error.value)
    assert "exited with code" in message
    assert "broken/config.pbtxt" in message and "Expected integer, got: oops" in message
    assert "CUDA" not in message  # GPU-less warnings are filtered out as noise


def test_serve_prints_endpoints_and_stops_cleanly_on_sigint(tiny_repository, tmp_path):
    ports = free_ports()
    command = ECOMSERVE + [
        "serve",
        "--repository",
        str(tiny_repository),
        "--http-port",
        str(ports.http),
        "--grpc-port",
        str(ports.grpc),
        "--metrics-port",
        str(ports.metrics),
    ]
    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
            lines.append(process.stderr.readline())
            assert process.poll() is None, "".join(lines)
        output = "".join(lines)
        assert f"http://127.0.0.1:{ports.http}" in output and f"127.0.0.1:{ports.grpc}" in output

        query = subprocess.run(
            ECOMSERVE
            + ["query", "embed", "red shoes", "blue bag", "--url", f"127.0.0.1:{ports.grpc}", "--protocol", "grpc"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert query.returncode == 0, query.stderr
        embeddings = json.loads(query.stdout)["embeddings"]
        assert len(embeddings) == 2 and len(embeddings[0]) == 32

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        assert "tritonserver stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    # Triton let go of the ports: nothing of it is left behind.
    assert all(_can_bind(port) for port in ports.named().values())


def _can_bind(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_query_commands_print_json(default_server):
    url = ["--url", default_server.http_url]
    rank = subprocess.run(
        ECOMSERVE + ["query", "rank", "running shoes", "coffee grinder", "trail running shoe", *url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rank.returncode == 0, rank.stderr
    ranked = json.loads(rank.stdout)
    assert ranked["order"] == [1, 0] and len(ranked["encoder_scores"]) == 1
    classify = subprocess.run(
        ECOMSERVE + ["query", "classify", "espresso machine", "--label", "shoes", "--label", "kitchen", *url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert classify.returncode == 0, classify.stderr
    assert json.loads(classify.stdout)["label"] == "kitchen"


def test_cli_errors_are_one_line_and_exit_1(default_server, tmp_path):
    bad = subprocess.run(
        ECOMSERVE + ["query", "embed", "", "--url", default_server.http_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert "error:" in bad.stderr and "TEXT[0]" in bad.stderr and "Traceback" not in bad.stderr
    down = subprocess.run(
        ECOMSERVE + ["query", "embed", "x", "--url", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert down.returncode == 1 and "is `ecomserve serve` running?" in down.stderr
    spec = subprocess.run(ECOMSERVE + ["build", "--spec", str(tmp_path / "none.yaml")], capture_output=True, text=True)
    assert spec.returncode == 1 and "spec not found" in spec.stderr
