"""serving_models/cpu_share.py: an encoder instance goes wide (serving.idle_threads) only while every other encoder
instance of the server is idle; a dead instance never counts as busy. Real processes and real flocks."""

from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np
import pytest
from support import make_tiny_bert

from ecomserve.export.onnx_export import export_onnx
from ecomserve.export.pooled_encoder import PooledEncoder, load_encoder
from ecomserve.runtime import LENGTH_CHUNK, run_by_length
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
    import json
    import subprocess
    import sys

    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        pytest.skip("this machine has a single core")
    command = [sys.executable, "-c", _PIN_AND_REPORT, str(pin_cores).lower()]
    child = subprocess.run(
        command, capture_output=True, text=True, check=True, preexec_fn=lambda: os.sched_setaffinity(0, cores)
    )
    assert json.loads(child.stdout) == ([cores[1]] if pin_cores else cores)
