"""The chart's TensorRT engine build script (files/build_engines.py), run against stand-ins for trtexec and
nvidia-smi: plans cached per GPU and TensorRT, checked against the repository's expected rows.

Checked without a cluster, like every tests/test_k8s_*.py (helpers: tests/k8s_tools.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from k8s_tools import (
    CHART,
    run,
)


def write_executable(path: Path, body: str) -> None:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)


# trtexec's stand-in: logs each call (arguments and working directory); a build checks the ONNX file
# and the relative --calib= file and writes a plan; a check run (--loadEngine) reads the check files
# from its working directory and exports the expected rows, or rows perturbed or NaN per FAKE_TRT_OUTPUT,
# in trtexec's --exportOutput format (which prints NaN as a bare nan).
FAKE_TRTEXEC = """\
import json, os, sys
import numpy as np
print('&&&& RUNNING TensorRT.trtexec [TensorRT v100500] # trtexec')
args = dict(a.lstrip('-').split('=', 1) for a in sys.argv[1:] if '=' in a)
with open(os.environ['FAKE_TRT_CALLS'], 'a') as calls:
    calls.write(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd()}) + '\\n')
if 'saveEngine' in args:
    if 'calib' in args and not os.path.isfile(args['calib']):
        sys.exit(f"cannot open calibration cache {args['calib']} in {os.getcwd()}")
    open(args['saveEngine'], 'wb').write(b'plan for ' + open(args['onnx'], 'rb').read())
if 'loadEngine' in args:
    assert open(args['loadEngine'], 'rb').read().startswith(b'plan for ')
    inputs = dict(item.split(':') for item in args['loadInputs'].split(','))
    batch, sequence = (int(n) for n in args['shapes'].split(',')[0].split(':')[1].split('x'))
    assert all(os.path.getsize(file) == batch * sequence * 8 for file in inputs.values())
    rows = np.fromfile('check_expected.bin', dtype='<f4').reshape(batch, -1)
    mode = os.environ.get('FAKE_TRT_OUTPUT', 'exact')
    if mode == 'perturbed':
        rows = rows + np.random.default_rng(0).normal(0, 0.1, rows.shape).astype(np.float32)
    values = ', '.join('nan' if mode == 'nan' and i == 3 else repr(float(v)) for i, v in enumerate(rows.ravel()))
    with open(args['exportOutput'], 'w') as out:
        out.write('[\\n  { "name" : "embedding"\\n  , "dimensions" : "%dx%d"\\n  , "values" : [ %s ]\\n  }\\n]\\n'
                  % (rows.shape[0], rows.shape[1], values))
"""


class EngineStandIns:
    """A model repository, trtexec and nvidia-smi stand-ins, and runs of build_engines.py against them."""

    def __init__(self, tmp_path: Path):
        self.source, self.serving, self.cache = tmp_path / "repository", tmp_path / "serving", tmp_path / "cache"
        self.engines, self.calls, self.bin_dir = tmp_path / "engines.json", tmp_path / "trtexec-calls", tmp_path / "bin"
        self.bin_dir.mkdir()
        write_executable(self.bin_dir / "nvidia-smi", "print('NVIDIA H100 80GB HBM3')\n")
        write_executable(self.bin_dir / "trtexec", FAKE_TRTEXEC)
        self.version_dir = self.source / "encoder_trt" / "1"
        self.version_dir.mkdir(parents=True)
        (self.source / "encoder_trt" / "config.pbtxt").write_text('platform: "tensorrt_plan"\n')
        (self.version_dir / "model.onnx").write_bytes(b"onnx v1")
        (self.source / "embed" / "1").mkdir(parents=True)

    def write_manifest(self, min_cosine: float = 0.999) -> dict:
        """tensorrt_engines.json and the check files, as `ecomserve build --target tensorrt` writes them."""
        rng = np.random.default_rng(1)
        input_ids = rng.integers(1, 1000, (5, 7)).astype("<i8")
        expected = rng.normal(size=(5, 16)).astype("<f4")
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
        (self.version_dir / "check_input_ids.bin").write_bytes(input_ids.tobytes())
        (self.version_dir / "check_attention_mask.bin").write_bytes(np.ones_like(input_ids).tobytes())
        (self.version_dir / "check_expected.bin").write_bytes(expected.tobytes())
        (self.version_dir / "calibration.cache").write_text("TRT-100500-EntropyCalibration2\n")
        engine = {
            "model": "encoder_trt", "version": "1", "onnx": "model.onnx",
            "trtexecArgs": ["--minShapes=input_ids:1x1,attention_mask:1x1", "--fp16", "--int8",
                            "--calib=calibration.cache"],
            "check": {
                "shapes": "input_ids:5x7,attention_mask:5x7",
                "inputs": {"input_ids": "check_input_ids.bin", "attention_mask": "check_attention_mask.bin"},
                "output": "embedding", "expected": "check_expected.bin", "dim": 16, "min_cosine": min_cosine,
            },
        }  # fmt: skip
        (self.source / "tensorrt_engines.json").write_text(json.dumps([engine], indent=2))
        return engine

    def run(self, values_engines: list, output: str = "exact") -> subprocess.CompletedProcess:
        self.engines.write_text(json.dumps(values_engines))
        self.serving.mkdir(exist_ok=True)
        env = {
            **os.environ, "PATH": f"{self.bin_dir}{os.pathsep}{os.environ['PATH']}",
            "SOURCE_REPOSITORY": str(self.source), "SERVING_REPOSITORY": str(self.serving),
            "ENGINE_CACHE": str(self.cache), "ENGINES_FILE": str(self.engines),
            "FAKE_TRT_CALLS": str(self.calls), "FAKE_TRT_OUTPUT": output,
        }  # fmt: skip
        env.pop("TRT_VERSION", None)
        # -S: no site-packages, as in the TensorRT image (no numpy there).
        return run([sys.executable, "-S", CHART / "files" / "build_engines.py"], env=env)

    def trtexec_calls(self, flag: str) -> list[dict]:
        """The calls with `flag` (--saveEngine: builds, --loadEngine: checks), --help excluded."""
        if not self.calls.exists():
            return []
        calls = [json.loads(line) for line in self.calls.read_text().splitlines()]
        return [call for call in calls if any(arg.startswith(f"{flag}=") for arg in call["argv"])]

    def plans(self) -> list[Path]:
        return sorted(self.cache.glob("*/*/encoder_trt/*/model.plan*"))


def test_engine_build_caches_plans_per_gpu_and_tensorrt(tmp_path):
    trt = EngineStandIns(tmp_path)

    def build(args: list[str]) -> subprocess.CompletedProcess:
        return trt.run([{"model": "encoder_trt", "version": "1", "onnx": "model.onnx", "trtexecArgs": args}])

    first = build(["--fp16"])
    assert first.returncode == 0, first.stderr
    (plan,) = trt.plans()
    assert plan.relative_to(trt.cache).parts[:2] == ("nvidia-h100-80gb-hbm3", "trt-100500")
    assert plan.read_bytes() == b"plan for onnx v1"
    (build_call,) = trt.trtexec_calls("--saveEngine")
    assert build_call["cwd"] == str(trt.version_dir), "trtexec runs in the version folder"
    assert json.loads((plan.parent / "build.json").read_text())["check"] is None
    served = trt.serving
    assert (served / "embed").resolve() == (trt.source / "embed").resolve()
    assert (served / "encoder_trt" / "1" / "model.plan").resolve() == plan.resolve()
    config = (trt.source / "encoder_trt" / "config.pbtxt").resolve()
    assert (served / "encoder_trt" / "config.pbtxt").resolve() == config
    assert build(["--fp16"]).returncode == 0
    assert len(trt.trtexec_calls("--saveEngine")) == 1, "the cached plan must be reused"
    assert build(["--fp16", "--builderOptimizationLevel=5"]).returncode == 0
    assert len(trt.trtexec_calls("--saveEngine")) == 2, "new trtexec flags must build a new plan"
    assert not trt.trtexec_calls("--loadEngine"), "an engine without a check is not run"
    (trt.version_dir / "model.onnx").unlink()
    missing = build(["--fp16"])
    assert missing.returncode == 1 and "tensorrt.engines[0]" in missing.stderr


def test_engine_build_reads_the_repository_manifest_and_checks_the_plan(tmp_path):
    trt = EngineStandIns(tmp_path)
    trt.write_manifest()
    trt.version_dir.chmod(0o555)  # the repository volume is mounted read-only
    try:
        result = trt.run([])
    finally:
        trt.version_dir.chmod(0o755)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tensorrt_engines.json" in result.stdout
    (plan,) = trt.plans()
    (build_call,) = trt.trtexec_calls("--saveEngine")
    assert build_call["cwd"] == str(trt.version_dir) and "--calib=calibration.cache" in build_call["argv"]
    (check_call,) = trt.trtexec_calls("--loadEngine")
    assert check_call["cwd"] == str(trt.version_dir)
    args = dict(arg.split("=", 1) for arg in check_call["argv"])
    assert args["--shapes"] == "input_ids:5x7,attention_mask:5x7"
    assert args["--loadInputs"] == "input_ids:check_input_ids.bin,attention_mask:check_attention_mask.bin"
    for absolute in ("--loadEngine", "--exportOutput"):
        assert Path(args[absolute]).is_absolute() and trt.source not in Path(args[absolute]).parents
    assert Path(args["--loadEngine"]).parent == plan.parent, "the plan is checked before it takes its name"
    record = json.loads((plan.parent / "build.json").read_text())
    assert record["check"]["min_cosine"] == pytest.approx(1.0, abs=1e-5) and record["check"]["texts"] == 5
    assert (trt.serving / "encoder_trt" / "1" / "model.plan").resolve() == plan.resolve()
    assert (trt.serving / "encoder_trt" / "1" / "check_expected.bin").is_file()

    again = trt.run([])
    assert again.returncode == 0, again.stderr
    assert len(trt.trtexec_calls("--saveEngine")) == len(trt.trtexec_calls("--loadEngine")) == 1, (
        "a cached plan is neither rebuilt nor checked again"
    )


def test_engines_in_values_replace_the_repository_manifest(tmp_path):
    trt = EngineStandIns(tmp_path)
    manifest_entry = trt.write_manifest()
    override = {**manifest_entry, "trtexecArgs": ["--fp16"]}
    del override["check"]
    result = trt.run([override])
    assert result.returncode == 0, result.stderr
    (build_call,) = trt.trtexec_calls("--saveEngine")
    assert build_call["argv"][2:] == ["--fp16"] and not trt.trtexec_calls("--loadEngine")
    checked_override = trt.run([{**override, "trtexecArgs": ["--fp16", "--noTF32"], "check": manifest_entry["check"]}])
    assert checked_override.returncode == 0, checked_override.stderr
    assert len(trt.trtexec_calls("--loadEngine")) == 1, "a check given in values runs too"


@pytest.mark.parametrize(("output", "worst"), [("perturbed", r"0\.\d+"), ("nan", "nan")])
def test_engine_failing_its_check_is_deleted_and_stops_the_pod(tmp_path, output, worst):
    trt = EngineStandIns(tmp_path)
    trt.write_manifest(min_cosine=0.999)
    result = trt.run([], output=output)
    assert result.returncode == 1, result.stdout
    (error,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert re.search(rf"error: encoder_trt: .*min cosine {worst} < 0\.999 .*plan was deleted", error), error
    assert trt.plans() == [], "no plan (nor partial file) may stay in the cache"
    assert not (trt.serving / "encoder_trt").exists(), "nothing is served"
    assert len(trt.trtexec_calls("--saveEngine")) == 1


def test_engine_build_needs_values_or_a_manifest(tmp_path):
    result = EngineStandIns(tmp_path).run([])
    assert result.returncode == 1
    assert "tensorrt.engines is empty and the repository has no tensorrt_engines.json" in result.stderr
