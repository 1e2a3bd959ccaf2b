"""serving_models/cpu_share.py: an encoder instance goes wide (serving.idle_threads) or spreads a batch's chunks over
the other instances' cores (serving.spread_batches) only while every other encoder instance of the server is idle; a
dead instance never counts as busy. Real processes, real threads and real flocks."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial

import numpy as np
import pytest
from support import make_tiny_bert

from ecomserve.export.onnx_export import export_onnx
from ecomserve.export.pooled_encoder import PooledEncoder, load_encoder
from ecomserve.runtime import LENGTH_CHUNK, Spread, run_by_length
from ecomserve.serving_models.cpu_share import CpuShare, Runners, chunk_runner, load_runners, own_cores
from ecomserve.spec import ServingSpec


def test_an_instance_is_alone_only_while_the_others_idle(tmp_path):
    first, second = CpuShare(tmp_path, "embedder_0_0"), CpuShare(tmp_path, "embedder_0_1")
    with first.running():
        assert first.others_idle()
        with second.running():
            assert not second.others_idle()  # first is running a batch
            assert not first.others_idle()
    with second.running():
        assert second.others_idle()  # first finished
    second.close()
    assert not (tmp_path / second.name).exists()
    with first.running():
        assert first.others_idle()


def _hold_busy(folder, started) -> None:
    share = CpuShare(folder, "encoder_0_0")
    with share.running():
        started.set()
        signal.pause()  # killed while busy


def test_a_killed_instance_does_not_stay_busy(tmp_path):
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    other = context.Process(target=_hold_busy, args=(tmp_path, started), daemon=True)
    other.start()
    try:
        assert started.wait(60)
        share = CpuShare(tmp_path, "encoder_0_1")
        with share.running():
            assert not share.others_idle()
        os.kill(other.pid, signal.SIGKILL)
        other.join(10)
        with share.running():
            assert share.others_idle()  # the kernel dropped the dead stub's lock; its file stays behind, unlocked
    finally:
        if other.is_alive():
            other.kill()


def _tiny_runners(tmp_path):
    model = tmp_path / "model.onnx"
    export_onnx(PooledEncoder(load_encoder(make_tiny_bert(tmp_path / "tiny", seed=3), None), "mean"), model)
    return model, load_runners("onnxruntime", model, threads=1, idle_threads=2, device="cpu")


def test_wide_and_narrow_runs_give_the_same_vectors(tmp_path):
    model, runners = _tiny_runners(tmp_path)
    assert runners.wide is not None and runners.pick(True) is runners.wide and runners.pick(False) is runners.narrow
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, size=(5, 24)).astype(np.int64)
    mask = np.ones_like(ids)
    np.testing.assert_allclose(runners.wide(ids, mask), runners.narrow(ids, mask), atol=1e-6)
    assert load_runners("onnxruntime", model, threads=2, idle_threads=2, device="cpu").wide is None
    assert chunk_runner(runners, None) is runners.narrow  # no share: always narrow


def test_each_chunk_goes_wide_only_while_the_others_idle(tmp_path):
    """A batch that went wide steps back to one thread at its next chunk once another instance starts a batch."""
    _, runners = _tiny_runners(tmp_path)
    picked: list[str] = []
    recording = Runners(
        narrow=lambda ids, mask: picked.append("narrow") or runners.narrow(ids, mask),
        wide=lambda ids, mask: picked.append("wide") or runners.wide(ids, mask),
    )
    share, other = CpuShare(tmp_path / "share", "embedder_0_0"), CpuShare(tmp_path / "share", "embedder_0_1")
    ids = np.random.default_rng(1).integers(1000, 2000, size=(LENGTH_CHUNK * 3, 16)).astype(np.int64)
    mask = np.ones_like(ids)
    run = chunk_runner(recording, share)
    chunks = [slice(i, i + LENGTH_CHUNK) for i in range(0, len(ids), LENGTH_CHUNK)]
    with share.running():
        parts = [run(ids[chunks[0]], mask[chunks[0]])]
        with other.running():  # another instance starts a batch
            parts.append(run(ids[chunks[1]], mask[chunks[1]]))
        parts.append(run(ids[chunks[2]], mask[chunks[2]]))  # and finishes it
    assert picked == ["wide", "narrow", "wide"]
    np.testing.assert_allclose(np.concatenate(parts), runners.narrow(ids, mask), atol=1e-6)
    with share.running():
        np.testing.assert_allclose(run_by_length(run, ids, mask), runners.narrow(ids, mask), atol=1e-6)


def test_idle_threads_cannot_be_below_intra_op_threads():
    assert ServingSpec(intra_op_threads=1, idle_threads=2).idle_threads == 2
    with pytest.raises(ValueError, match="idle_threads"):
        ServingSpec(intra_op_threads=2, idle_threads=1)


def test_instances_keep_to_cores_of_their_own_only_when_the_cores_fit_them_exactly():
    assert own_cores({4, 5}, instances=2, threads=1, index=0) == [4]
    assert own_cores({4, 5}, instances=2, threads=1, index=1) == [5]
    assert own_cores({0, 1, 2, 3}, instances=2, threads=2, index=1) == [2, 3]
    assert own_cores({0, 1, 2, 3}, instances=2, threads=1, index=0) is None  # spare cores: the scheduler spreads
    assert own_cores({0}, instances=2, threads=1, index=1) is None


_PIN_AND_REPORT = """
import json, os, sys
from ecomserve.parameters import EncoderParameters
from ecomserve.serving_models.cpu_share import Runners, pin_instance
parameters = EncoderParameters(runtime="onnxruntime", model_file="model.onnx", intra_op_threads=1,
                               pin_cores=sys.argv[1] == "true")
config = {"instance_group": [{"count": 2, "kind": "KIND_CPU"}]}
pin_instance(config, "embedder_0_1", parameters, [Runners(narrow=None, wide=None)])
print(json.dumps(sorted(os.sched_getaffinity(0))))
"""


@pytest.mark.parametrize("pin_cores", [True, False])
def test_serving_pin_cores_decides_whether_an_instance_keeps_to_a_core(pin_cores):
    """Instance 1 of 2 single-threaded ones, in a process started on two cores: on the second core alone, or on
    both with `serving.pin_cores: false`."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        pytest.skip("this machine has a single core")
    command = [sys.executable, "-c", _PIN_AND_REPORT, str(pin_cores).lower()]
    child = subprocess.run(
        command, capture_output=True, text=True, check=True, preexec_fn=lambda: os.sched_setaffinity(0, cores)
    )
    assert json.loads(child.stdout) == ([cores[1]] if pin_cores else cores)


def _recording_tasks(count: int, seconds: float) -> tuple[list, list[int], set[int]]:
    """Tasks that keep a core busy (as a chunk does: a helper that only slept would look stalled and its task would
    be run again) and record which thread ran them and which of them ran."""
    threads: list[int] = []
    ran: set[int] = set()

    def task(index: int) -> None:
        threads.append(threading.get_ident())
        ends = time.perf_counter() + seconds  # long enough that the helper is up before the last task is taken
        while time.perf_counter() < ends:
            pass
        ran.add(index)

    return [partial(task, index) for index in range(count)], threads, ran


def test_a_batch_spreads_its_chunks_only_while_the_other_instances_idle(tmp_path):
    share, other = CpuShare(tmp_path, "embedder_0_0"), CpuShare(tmp_path, "embedder_0_1")
    spread = Spread(share.others_idle, [[]])
    try:
        with share.running():
            tasks, threads, ran = _recording_tasks(6, 0.05)
            spread.run_tasks(tasks)
            # Every task ran (a stalled helper's task may have run twice), the calling thread among them.
            assert ran == set(range(6)) and threading.get_ident() in threads
            assert len(set(threads)) == 2  # a helper took some of them
            with other.running():  # another instance is running a batch: its core is not ours to take
                tasks, threads, ran = _recording_tasks(6, 0.01)
                spread.run_tasks(tasks)
            assert set(threads) == {threading.get_ident()} and ran == set(range(6))
            tasks, threads, _ = _recording_tasks(1, 0.01)
            spread.run_tasks(tasks)
            assert threads == [threading.get_ident()]
    finally:
        spread.close()


def test_spread_chunks_give_the_same_vectors(tmp_path):
    _, runners = _tiny_runners(tmp_path)
    spread = Spread(lambda: True, [[]])
    rng = np.random.default_rng(2)
    ids = rng.integers(1000, 2000, size=(LENGTH_CHUNK * 4 + 3, 20)).astype(np.int64)
    mask = (np.arange(20)[None, :] < rng.integers(3, 21, size=(len(ids), 1))).astype(np.int64)
    try:
        spread_vectors = run_by_length(runners.narrow, ids, mask, spread.run_tasks)
    finally:
        spread.close()
    alone = np.concatenate(
        [runners.narrow(ids[i : i + 1, : mask[i].sum()], mask[i : i + 1, : mask[i].sum()]) for i in range(len(ids))]
    )
    np.testing.assert_allclose(spread_vectors, alone, atol=1e-5)


_SPREAD_AND_REPORT = """
import json, os, sys, threading, time
from ecomserve.parameters import EncoderParameters
from ecomserve.serving_models.cpu_share import InstanceCpu, Runners
parameters = EncoderParameters(runtime="onnxruntime", model_file="model.onnx", intra_op_threads=1,
                               spread_batches=True)
config = {"instance_group": [{"count": 2, "kind": "KIND_CPU"}]}
cpu = InstanceCpu(config, "embedder_0_0", parameters, [Runners(narrow=None, wide=None)])
seen = {}
def task():
    seen[threading.get_ident()] = sorted(os.sched_getaffinity(0))
    time.sleep(0.05)
with cpu.running():
    cpu.spread.run_tasks([task] * 4)
print(json.dumps({"own": seen.pop(threading.get_ident()), "helpers": list(seen.values())}))
"""


def test_a_pinned_instance_spreads_onto_the_other_instances_core():
    """Instance 0 of 2 single-threaded ones on two cores keeps to the first; its helper runs on the second."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        pytest.skip("this machine has a single core")
    child = subprocess.run(
        [sys.executable, "-c", _SPREAD_AND_REPORT],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cores),
    )
    assert json.loads(child.stdout) == {"own": [cores[0]], "helpers": [[cores[1]]]}


_SPREAD_WHEN_RESTED = """
import json, threading, time
import numpy as np
from ecomserve.parameters import EncoderParameters
from ecomserve.serving_models.cpu_share import RESTED_S, InstanceCpu, Runners
parameters = EncoderParameters(runtime="onnxruntime", model_file="model.onnx", intra_op_threads=1,
                               spread_batches=True, pin_cores=False)
config = {"instance_group": [{"count": 2, "kind": "KIND_CPU"}]}
def chunk(input_ids, attention_mask):
    threads.add(threading.get_ident())
    ends = time.perf_counter() + 0.02  # busy, as a chunk is: a sleeping helper would look stalled
    while time.perf_counter() < ends:
        pass
    return np.zeros((len(input_ids), 2), dtype=np.float32)
runners = Runners(narrow=chunk, wide=None)
cpu = InstanceCpu(config, "embedder_0_0", parameters, [runners])
ids = np.ones((32, 4), dtype=np.int64)
def helped() -> bool:
    threads.clear()
    with cpu.running():
        cpu.run(runners, ids, ids)
    return len(threads) > 1
def helped_after_rest() -> bool:
    # A SCHED_IDLE helper gets no CPU while anything else on this machine wants it; its chunk is then run by the
    # calling thread. Resting may let a batch spread, it cannot make the helper run: a few tries.
    for _ in range(5):
        time.sleep(RESTED_S * 2)
        if helped():
            return True
    return False
threads = set()
report = {"first": helped_after_rest()}
time.sleep(RESTED_S / 5)  # the helper is free again by then, but the instance has not rested
report["right_after"] = helped()
report["rested"] = helped_after_rest()
print(json.dumps(report))
"""


def test_a_batch_right_after_the_last_stays_on_its_own_core():
    """Under a steady load an instance's batches follow each other closely: only a batch after RESTED_S idle
    spreads."""
    child = subprocess.run([sys.executable, "-c", _SPREAD_WHEN_RESTED], capture_output=True, text=True, check=True)
    assert json.loads(child.stdout) == {"first": True, "right_after": False, "rested": True}


def test_the_calling_thread_runs_a_helpers_task_itself_once_its_core_is_taken():
    """A helper's core goes to another instance mid-task (SCHED_IDLE: the helper stalls, here asleep); the batch
    does not wait for it."""
    busy, main = threading.Event(), threading.current_thread()
    on_main: list[int] = []

    def task(index: int):
        def run() -> None:
            if threading.current_thread() is not main:
                busy.set()  # another instance starts a batch on the helper's core
                time.sleep(1.0)
                return
            time.sleep(0.05)
            on_main.append(index)

        return run

    spread = Spread(lambda: not busy.is_set(), [[]])
    try:
        began = time.perf_counter()
        spread.run_tasks([task(index) for index in range(4)])
        took = time.perf_counter() - began
    finally:
        spread.close()
    assert busy.is_set()  # the helper did take a task
    assert sorted(on_main) == [0, 1, 2, 3] and took < 0.9


def test_a_task_that_fails_on_a_helper_runs_again_on_the_calling_thread():
    main, ran = threading.current_thread(), []

    def task() -> None:
        if threading.current_thread() is not main:
            raise RuntimeError("helper failed")
        time.sleep(0.05)
        ran.append(1)

    spread = Spread(lambda: True, [[]])
    try:
        spread.run_tasks([task] * 4)
    finally:
        spread.close()
    assert len(ran) == 4
