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
from ecomserve.serving_models.cpu_share import CpuShare, load_runners, running
from ecomserve.spec import ServingSpec


def test_an_instance_is_alone_only_while_the_others_idle(tmp_path):
    first, second = CpuShare(tmp_path, "embedder_0_0"), CpuShare(tmp_path, "embedder_0_1")
    with first.running() as alone:
        assert alone
        with second.running() as second_alone:
            assert not second_alone  # first is running a batch
    with second.running() as alone:
        assert alone  # first finished
    second.close()
    assert not (tmp_path / second.name).exists()
    with first.running() as alone:
        assert alone


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
        with share.running() as alone:
            assert not alone
        os.kill(other.pid, signal.SIGKILL)
        other.join(10)
        with share.running() as alone:
            assert alone  # the kernel dropped the dead stub's lock; its file stays behind, unlocked
    finally:
        if other.is_alive():
            other.kill()


def test_wide_and_narrow_runs_give_the_same_vectors(tmp_path):
    model = tmp_path / "model.onnx"
    export_onnx(PooledEncoder(load_encoder(make_tiny_bert(tmp_path / "tiny", seed=3), None), "mean"), model)
    runners = load_runners("onnxruntime", model, threads=1, idle_threads=2, device="cpu")
    assert runners.wide is not None and runners.pick(True) is runners.wide and runners.pick(False) is runners.narrow
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, size=(5, 24)).astype(np.int64)
    mask = np.ones_like(ids)
    np.testing.assert_allclose(runners.wide(ids, mask), runners.narrow(ids, mask), atol=1e-6)
    assert load_runners("onnxruntime", model, threads=2, idle_threads=2, device="cpu").wide is None
    with running(None) as others_idle:  # no share: always narrow
        assert others_idle is False


def test_idle_threads_cannot_be_below_intra_op_threads():
    assert ServingSpec(intra_op_threads=1, idle_threads=2).idle_threads == 2
    with pytest.raises(ValueError, match="idle_threads"):
        ServingSpec(intra_op_threads=2, idle_threads=1)
