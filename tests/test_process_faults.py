"""Process faults on the real server: kill -9 of a stub, of tritonserver, of the front and of
`ecomserve serve` itself. After each, the server answers correctly again (or, when its parent died,
nothing of it is left): no orphaned stub, no stub of an old instance, no leaked /dev/shm region, and
the ports are free for the next start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from raw_protocol import Tensor, infer
from support import make_tiny_bert, spec_from, start_server, wait_for

from ecomserve.server.process import SHM_FOLDER, Ports, free_port
from ecomserve.server.stub_watchdog import stub_model

pytestmark = pytest.mark.integration

KNOWN = [Tensor("TEXT", "BYTES", [1, 1], [b"insulated water bottle"])]


@pytest.fixture(scope="module")
def crashable(tmp_path_factory):
    """A tiny pipeline with two encoder instances, so a dead stub has a living sibling."""
    root = tmp_path_factory.mktemp("faults")
    source = make_tiny_bert(root / "tiny", seed=11)
    spec = spec_from(
        {"encoders": [{"name": "tiny", "source": str(source), "max_seq_len": 32}], "serving": {"instances": 2}}
    )
    # Started on two cores, so its two single-threaded instances fit them exactly and each keeps to its own
    # (cpu_share.pin_instance); the children inherit the set, this process gets its own back.
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores[:2])
    try:
        server = start_server(spec, root)
    finally:
        os.sched_setaffinity(0, cores)
    server.known = infer("grpc", server, "embed", KNOWN).outputs["EMBEDDING"]
    yield server
    server.stop()


def answers_correctly(server) -> bool:
    for protocol in ("http", "grpc"):
        answer = infer(protocol, server, "embed", KNOWN)
        if not answer.ok or np.abs(answer.outputs["EMBEDDING"] - server.known).max() > 1e-5:
            return False
        fresh = [Tensor("TEXT", "BYTES", [1, 1], [f"camping stove {uuid.uuid4().hex[:8]}".encode()])]
        if not infer(protocol, server, "embed", fresh).ok:
            return False
    return True


def stubs_of(server_pid: int) -> dict[int, str]:
    """Living stubs of a tritonserver: pid -> model."""
    stubs = {}
    for child in psutil.Process(server_pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                stubs[child.pid] = stub_model(child.cmdline())
        except psutil.NoSuchProcess:
            continue
    return stubs


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def regions(prefix: str) -> list[Path]:
    return list(SHM_FOLDER.glob(f"{prefix}*"))


def test_a_killed_stub_is_replaced_and_no_old_instance_stays_behind(crashable):
    before = stubs_of(crashable.pid)
    embedders = sorted(pid for pid, model in before.items() if model == "embedder")
    assert len(embedders) == 2
    os.kill(embedders[0], signal.SIGKILL)
    assert wait_for(lambda: answers_correctly(crashable), timeout_s=60)
    # The sibling of the dead stub belongs to the old instances: Triton unloads it, or the watchdog ends it.
    assert wait_for(lambda: not alive(embedders[1]), timeout_s=30), "the old sibling stub outlived the restart"
    now = stubs_of(crashable.pid)
    assert sorted(now.values()) == sorted(before.values()), "one stub per instance, as before"
    assert answers_correctly(crashable)


def test_a_killed_tritonserver_is_restarted_without_orphans_or_leaked_shared_memory(crashable):
    old_pid, old_prefix = crashable.pid, crashable.shm_prefix
    old_stubs = list(stubs_of(old_pid))
    assert old_stubs and regions(old_prefix)
    os.kill(old_pid, signal.SIGKILL)
    assert wait_for(lambda: "tritonserver" in crashable.restarts and answers_correctly(crashable), timeout_s=120)
    assert not [pid for pid in old_stubs if alive(pid)], "stubs of the killed tritonserver are still running"
    assert not regions(old_prefix), "the killed server's shared memory was not released"
    assert regions(crashable.shm_prefix)


def test_a_killed_front_is_restarted(crashable):
    old_front = crashable.front_pid
    os.kill(old_front, signal.SIGKILL)
    assert wait_for(lambda: "the front" in crashable.restarts and answers_correctly(crashable), timeout_s=60)


def test_killing_ecomserve_serve_takes_every_child_along(crashable, tmp_path):
    """kill -9 of `ecomserve serve`: tritonserver and the front get SIGTERM (PR_SET_PDEATHSIG), drain and
    exit; no stub or shared memory is left, and the next `serve` gets the same ports."""
    ports = Ports(free_port(), free_port(), free_port(), free_port())
    command = [sys.executable, "-m", "ecomserve", "serve", "--repository", str(crashable.options.repository)]
    command += ["--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)]
    command += ["--api-port", str(ports.api)]
    for attempt in ("first", "second"):
        serve = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: _ready(ports), timeout_s=120), f"{attempt} serve never got ready"
            children = psutil.Process(serve.pid).children(recursive=True)
            assert len(children) >= 4, children  # front, tritonserver, stubs
            (triton,) = [c for c in children if c.name() == "tritonserver"]
            prefix = next(a for a in triton.cmdline() if "shm-region-prefix-name=" in a).split("=")[-1]
            assert regions(prefix)
            serve.kill()
            serve.wait()
            assert wait_for(lambda started=children: not [c for c in started if alive(c.pid)], timeout_s=60), (
                f"children outlived `ecomserve serve`: {[c for c in children if alive(c.pid)]}"
            )
            assert not regions(prefix)
        finally:
            if serve.poll() is None:
                serve.kill()


def _ready(ports: Ports) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_server_threads_run_sched_batch(crashable):
    """Every thread of tritonserver, of each stub and of the front runs SCHED_BATCH (the spec's serving.scheduling, set
    before exec and inherited), whichever fault tests ran before and restarted some of them."""
    processes = [psutil.Process(crashable.pid), psutil.Process(crashable.front_pid)]
    processes += [psutil.Process(pid) for pid in stubs_of(crashable.pid)]
    assert len(processes) >= 4, processes  # tritonserver, the front and at least the embed model's two stubs
    policies = {(p.pid, t.id): os.sched_getscheduler(t.id) for p in processes for t in p.threads()}
    assert set(policies.values()) == {os.SCHED_BATCH}, policies


def test_each_encoder_instance_keeps_to_a_core_of_its_own(crashable):
    """Two single-threaded `embedder` instances started on two cores: one core each, every thread of the stub;
    other models' stubs keep the server's two, whichever fault tests ran before and restarted some of them."""
    if len(os.sched_getaffinity(crashable.pid)) != 2:
        pytest.skip("this machine has a single core")
    embedders = [pid for pid, model in stubs_of(crashable.pid).items() if model == "embedder"]
    assert len(embedders) == 2, stubs_of(crashable.pid)
    cores = [{frozenset(os.sched_getaffinity(t.id)) for t in psutil.Process(pid).threads()} for pid in embedders]
    assert all(len(each) == 1 and len(next(iter(each))) == 1 for each in cores), cores
    assert cores[0] != cores[1], cores
    others = [pid for pid, model in stubs_of(crashable.pid).items() if model != "embedder"]
    assert others and all(len(os.sched_getaffinity(pid)) == 2 for pid in others)
