"""Starting and stopping the real server, its error messages, and the `ecomserve` command line."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from support import make_tiny_bert, spec_from, wait_for

from ecomserve.errors import RepositoryError, ServerError
from ecomserve.repository.builder import built_spec
from ecomserve.server.environment import locate_triton
from ecomserve.server.process import Ports, ServerOptions, TritonServer, embedded_command, free_port

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
    return Ports(free_port(), free_port(), free_port(), free_port())


def test_busy_port_is_reported_before_starting(tiny_repository, tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        ports = Ports(http=free_port(), grpc=busy, metrics=free_port(), api=free_port())
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


def test_serve_prints_endpoints_recovers_a_dead_stub_and_stops_cleanly(tiny_repository, tmp_path):
    """`ecomserve serve` as a service runs it: the venv is not activated (its bin is not on PATH)."""
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
        "--api-port",
        str(ports.api),
    ]
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    process = subprocess.Popen(
        command, cwd=tmp_path, stderr=subprocess.PIPE, text=True, env={**os.environ, "PATH": path, "COLUMNS": "200"}
    )
    stderr = StderrLines(process)
    try:
        output = stderr.until("Ctrl-C")
        assert f"http://127.0.0.1:{ports.http}" in output and f"127.0.0.1:{ports.grpc}" in output
        assert len(_query_embed(ports)) == 2

        (triton,) = [c for c in psutil.Process(process.pid).children() if c.name() == "tritonserver"]
        (stub,) = [c for c in triton.children() if "/embedder/" in " ".join(c.cmdline())]
        stub.kill()
        assert "model 'embedder' restarted" in stderr.until("restarted")
        assert len(_query_embed(ports)) == 2

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        assert "tritonserver stopped" in stderr.until(None, timeout_s=30)
    finally:
        if process.poll() is None:
            process.kill()
    # Triton let go of the ports: nothing of it is left behind.
    assert all(_can_bind(port) for port in ports.named().values())


class StderrLines:
    """A child's stderr read by a thread into a queue, so that waiting for a line can time out: a child
    that goes silent fails the test after `timeout_s` instead of blocking it in readline."""

    def __init__(self, process: subprocess.Popen):
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(process.stderr,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)  # end of file: the child closed stderr or exited

    def until(self, marker: str | None, timeout_s: float = 180) -> str:
        """The lines up to the first holding `marker` (None: up to the end of the output)."""
        start, deadline = len(self.seen), time.monotonic() + timeout_s
        while marker is None or not any(marker in line for line in self.seen[start:]):
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {marker!r} on stderr within {timeout_s} s:\n{''.join(self.seen[start:])}")
            if line is None:
                if marker is None:
                    break
                pytest.fail(f"stderr ended before {marker!r}:\n{''.join(self.seen[start:])}")
            self.seen.append(line)
        return "".join(self.seen[start:])


def _query_embed(ports: Ports) -> list[list[float]]:
    query = subprocess.run(
        ECOMSERVE
        + ["query", "embed", "red shoes", "blue bag", "--url", f"127.0.0.1:{ports.grpc}", "--protocol", "grpc"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert query.returncode == 0, query.stderr
    embeddings = json.loads(query.stdout)["embeddings"]
    assert len(embeddings[0]) == 32
    return embeddings


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


def test_supervise_runs_tritonserver_behind_the_front_restarts_dead_stubs_and_passes_sigterm(tiny_repository, tmp_path):
    """The Kubernetes entrypoint: `python -m ecomserve.server.supervise … -- tritonserver …`, key in env."""
    ports = free_ports()
    options = ServerOptions(repository=tiny_repository, ports=ports, work_dir=tmp_path)
    install = locate_triton(tmp_path)
    command = [
        *[sys.executable, "-m", "ecomserve.server.supervise", f"--repository={tiny_repository}", "--host=127.0.0.1"],
        *[f"--http-port={ports.http}", f"--grpc-port={ports.grpc}", f"--metrics-port={ports.metrics}"],
        f"--api-port={ports.api}",
        *[f"--work-dir={tmp_path}", "--", *embedded_command(options, install)],
    ]
    env = {**install.environment(), "ECOMSERVE_ADMIN_KEY": "supervise-key"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    stderr = StderrLines(process)
    try:
        assert wait_for(lambda: _answers(ports), timeout_s=120), "the supervised server never answered"
        (triton,) = [c for c in psutil.Process(process.pid).children() if c.name() == "tritonserver"]
        assert "supervise-key" not in " ".join(triton.cmdline())
        # The response cache sized by the repository's spec (the chart passes no size of its own by default).
        cache_mb = built_spec(tiny_repository).serving.response_cache_mb
        assert f"--cache-config=local,size={cache_mb << 20}" in triton.cmdline()
        (stub,) = [c for c in triton.children() if "/embedder/" in c.cmdline()[1]]
        stub.kill()
        assert "model 'embedder' restarted" in stderr.until("restarted")
        assert len(_query_embed(ports)) == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, stderr.until(None, timeout_s=30)[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
    assert all(_can_bind(port) for port in ports.named().values())


def _answers(ports: Ports) -> bool:
    try:
        return len(_query_embed(ports)) == 2
    except Exception:
        return False


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        ([], "usage"),
        (["tritonserver", "--model-repository=/m"], "--model-control-mode=explicit"),
        (["tritonserver", "--model-control-mode", "poll"], "--model-control-mode=explicit"),
        (["tritonserver", "--model-control-mode=explicit", "--http-restricted-api=x:k=v"], "set by the supervisor"),
        (["tritonserver", "--model-control-mode=explicit", "--grpc-port", "1"], "set by the supervisor"),
    ],
)
def test_supervise_refuses_a_command_it_cannot_run_safely(command, problem):
    result = subprocess.run(
        [sys.executable, "-m", "ecomserve.server.supervise", "--repository=/m", "--", *command],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and problem in result.stderr
