"""How the stub watchdog reads dead stubs, on real child processes of this test process that carry a
stub's command line (`triton_python_backend_stub <repository>/<model>/<version>/model.py`). The restart
through a real tritonserver is tested in test_publish.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from ecomserve.server.stub_watchdog import STUB_BINARY, DeadStubs, stub_model


@pytest.fixture
def spawn(tmp_path):
    """Start a process named like a stub, serving `model`; it sleeps until killed. Reaped at teardown."""
    binary = tmp_path / STUB_BINARY
    binary.symlink_to(sys.executable)
    started: list[subprocess.Popen] = []

    def start(model: str) -> subprocess.Popen:
        script = tmp_path / "repository" / model / "1" / "model.py"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text("import time\ntime.sleep(120)\n")
        process = subprocess.Popen([str(binary), str(script)])
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def kill(process: subprocess.Popen) -> None:
    """Kill without reaping: the process stays a zombie, as a dead stub does under tritonserver."""
    os.kill(process.pid, signal.SIGKILL)
    os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)


def test_stub_model_reads_the_model_from_the_command_line():
    assert stub_model([f"/opt/backends/python/{STUB_BINARY}", "/models/embedder/3/model.py", "shm", "1048576"]) == (
        "embedder"
    )
    assert stub_model(["/usr/bin/python3", "/models/embedder/3/model.py"]) is None
    assert stub_model([STUB_BINARY]) is None


def test_a_dead_stub_counts_once_it_stays_dead(spawn):
    rank, embedder = spawn("rank"), spawn("embedder")
    stubs = DeadStubs(os.getpid())
    kill(rank)
    # the first sighting may be a stub between its normal exit and Triton's waitpid
    assert stubs.poll() == {}
    assert stubs.poll() == {"rank": {rank.pid}}
    assert stubs.poll() == {"rank": {rank.pid}}, "reported until recovered"
    stubs.recovered({rank.pid})
    assert stubs.poll() == {}
    kill(embedder)
    stubs.poll()
    assert stubs.poll() == {"embedder": {embedder.pid}}


def test_a_stub_reaped_between_polls_is_not_dead(spawn):
    rank = spawn("rank")
    stubs = DeadStubs(os.getpid())
    kill(rank)
    assert stubs.poll() == {}
    rank.wait()  # reaped, as Triton does when it unloads an instance
    assert stubs.poll() == {}


def test_a_stub_dead_before_any_poll_restarts_every_python_model(spawn):
    rank, classify, embedder = spawn("rank"), spawn("classify"), spawn("embedder")
    kill(embedder)
    stubs = DeadStubs(os.getpid())
    stubs.poll()
    assert stubs.poll() == {"rank": {embedder.pid}, "classify": {embedder.pid}}
    assert rank.poll() is None and classify.poll() is None


def test_a_stub_noted_between_polls_is_known_when_it_dies(spawn):
    """A restart's new stub, noted as the restart ends, that dies before the next poll: its own model restarts,
    not every python model."""
    classify = spawn("classify")
    stubs = DeadStubs(os.getpid())
    rank = spawn("rank")  # started after the last poll
    stubs.note_living()
    kill(rank)
    stubs.poll()
    assert stubs.poll() == {"rank": {rank.pid}}
    assert classify.poll() is None
