"""Session fixtures: real tritonservers on free loopback ports, each serving a repository built by
the real builder, stopped at the end of the session."""

from __future__ import annotations

import os
from pathlib import Path

# Nothing may come from a model hub: every model is bundled or built by the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
from support import make_tiny_bert, spec_from, start_server

from ecomserve.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def default_server(tmp_path_factory):
    """export/default.yaml: the bundled MiniLM, as `ecomserve serve` runs it."""
    server = start_server(load_spec(ROOT / "export/default.yaml"), tmp_path_factory.mktemp("default"), ROOT / "export")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ensemble_server(tmp_path_factory):
    """export/ensemble.yaml: full MiniLM (weight 2) + MiniLM pruned to 3 layers (weight 1)."""
    server = start_server(
        load_spec(ROOT / "export/ensemble.yaml"), tmp_path_factory.mktemp("ensemble"), ROOT / "export"
    )
    yield server
    server.stop()


TRIO_WEIGHTS = (1.0, 2.0, 3.0)


@pytest.fixture(scope="session")
def trio_sources(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiny")
    return [make_tiny_bert(root / f"tiny{seed}", seed) for seed in range(len(TRIO_WEIGHTS))]


@pytest.fixture(scope="session")
def trio_spec(trio_sources):
    """Three tiny random encoders (weights 1, 2, 3; small limits; ensemble layout): votes can split 2 to 1."""
    return spec_from(
        {
            "encoders": [
                # the middle encoder runs on OpenVINO, so both CPU runtimes serve inside one pipeline
                {"name": f"tiny{i}", "source": str(source), "weight": weight, "max_seq_len": 32, "runtime": runtime}
                for i, (source, weight, runtime) in enumerate(
                    zip(trio_sources, TRIO_WEIGHTS, ("onnxruntime", "openvino", "onnxruntime"))
                )
            ],
            "fusion": {"mode": "weighted_mean"},
            "voting": {"mode": "majority"},
            # The fused layout serves the other pipelines; this one keeps the ensemble layout tested.
            "serving": {"layout": "ensemble"},
            "limits": {"max_text_bytes": 256, "max_candidates": 8, "max_labels": 8},
        }
    )


@pytest.fixture(scope="session")
def trio_server(trio_spec, tmp_path_factory):
    server = start_server(trio_spec, tmp_path_factory.mktemp("trio"))
    yield server
    server.stop()


@pytest.fixture(params=["http", "grpc"])
def protocol(request) -> str:
    return request.param
