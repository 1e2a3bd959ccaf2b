"""TensorRT engines for the GPU targets.

A plan runs only on the GPU model and TensorRT release that built it, so the CPU build never makes
one. It leaves, in each encoder's version folder, everything `trtexec` needs on the target GPU:

- `model.onnx`: the fp32 export, already checked against PyTorch;
- `calibration.cache` (INT8): per-tensor scales from shipped text, in TensorRT's own cache format;
- `check_*.bin`: the parity texts as token ids and their fp32 PyTorch embeddings, so a freshly built
  engine is checked before anything serves it;

and at the repository root `tensorrt_engines.json`: per encoder, the trtexec flags (optimisation
profile, precision, the layers kept in FP32) and the check. `ecomserve build --target tensorrt` runs
them where trtexec exists (the NGC container); the Helm chart's init container runs the same file.
Nothing here has run on a GPU in this project's CI: the plan-building and checking functions are
exercised only where trtexec is present.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecomserve.errors import ExportError
from ecomserve.runtime import ENCODER_INPUTS, ENCODER_OUTPUT
from ecomserve.spec import EncoderSpec, PipelineSpec

PLAN_FILE = "model.plan"
ONNX_FILE = "model.onnx"
ENGINES_FILE = "tensorrt_engines.json"
CALIBRATION_CACHE = "calibration.cache"
CHECK_INPUTS = {name: f"check_{name}.bin" for name in ENCODER_INPUTS}
CHECK_EXPECTED = "check_expected.bin"
CHECK_OUTPUT = "check_output.json"
# TensorRT inside nvcr.io/nvidia/tritonserver:24.10-py3, the image that matches the embedded Triton 2.51.
TENSORRT_RELEASE = "10.5.0"
TRTEXEC_PATHS = ("/usr/src/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec")
FP16_MAX = 65504.0
# Layers that overflow or lose precision in FP16: LayerNorm's variance, Softmax's exponentials, and the
# pooling tail (masked sum, count, L2 norm, division). They stay FP32 in FP16 and INT8 engines.
FP32_OPS = {"LayerNormalization", "Softmax", "ReduceSum", "ReduceMean", "ReduceL2", "Pow", "Sqrt", "Div", "Clip"}


def shape_flag(batch: int, sequence: int) -> str:
    """A trtexec shape value (--minShapes, --shapes …): every encoder input at [batch, sequence]."""
    return ",".join(f"{name}:{batch}x{sequence}" for name in ENCODER_INPUTS)


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimisation profile: (batch, sequence) at its minimum, tuned and maximum shapes."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    def shapes(self, which: str) -> str:
        return shape_flag(*getattr(self, which))


def profile(spec: PipelineSpec, encoder: EncoderSpec) -> Profile:
    batching, gpu = spec.serving.dynamic_batching, spec.serving.gpu
    opt_batch = gpu.opt_batch_size or max(batching.preferred_batch_size, default=batching.max_batch_size)
    return Profile(
        min=(1, 1),
        opt=(opt_batch, min(gpu.opt_seq_len, encoder.max_seq_len)),
        max=(batching.max_batch_size, encoder.max_seq_len),
    )


def fp32_layers(onnx_path: Path) -> list[str]:
    """Names of the float-valued nodes of FP32_OPS, and of the nodes adding the attention mask (its
    -3.4e38 is -inf in FP16); integer shape arithmetic is left to TensorRT."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    float_values = {v.name for v in [*model.graph.value_info, *model.graph.output] if v.type.tensor_type.elem_type == 1}
    softmax_inputs = {n.input[0] for n in model.graph.node if n.op_type == "Softmax"}
    return [
        n.name
        for n in model.graph.node
        if n.output[0] in float_values and (n.op_type in FP32_OPS or n.output[0] in softmax_inputs)
    ]


def trtexec_args(spec: PipelineSpec, encoder: EncoderSpec, onnx_path: Path) -> list[str]:
    """trtexec flags for one encoder, run in its version folder (`--onnx` and `--saveEngine` are added)."""
    shapes = profile(spec, encoder)
    args = [
        f"--minShapes={shapes.shapes('min')}",
        f"--optShapes={shapes.shapes('opt')}",
        f"--maxShapes={shapes.shapes('max')}",
        f"--memPoolSize=workspace:{spec.serving.gpu.workspace_mb}M",
        "--skipInference",
    ]
    if encoder.precision == "fp32":
        return args
    # INT8 engines fall back to FP16 where no INT8 kernel exists; both keep the sensitive layers in FP32.
    args += ["--fp16"]
    if encoder.precision == "int8":
        args += ["--int8", f"--calib={CALIBRATION_CACHE}"]
    layers = ",".join(f"{name}:fp32" for name in fp32_layers(onnx_path))
    return [*args, "--precisionConstraints=obey", f"--layerPrecisions={layers}", f"--layerOutputTypes={layers}"]


def write_check_files(
    target_dir: Path, input_ids: np.ndarray, attention_mask: np.ndarray, expected: np.ndarray
) -> dict:
    """The post-build check's inputs and fp32 reference, as the raw little-endian files trtexec loads."""
    (target_dir / CHECK_INPUTS["input_ids"]).write_bytes(input_ids.astype("<i8").tobytes())
    (target_dir / CHECK_INPUTS["attention_mask"]).write_bytes(attention_mask.astype("<i8").tobytes())
    (target_dir / CHECK_EXPECTED).write_bytes(expected.astype("<f4").tobytes())
    return {
        "shapes": shape_flag(*input_ids.shape),
        "inputs": CHECK_INPUTS,
        "output": ENCODER_OUTPUT,
        "expected": CHECK_EXPECTED,
        "dim": int(expected.shape[1]),
    }


def check_args(check: dict, output: Path) -> list[str]:
    """trtexec flags that run a built plan once on the check inputs and write its output as JSON."""
    inputs = ",".join(f"{name}:{file}" for name, file in check["inputs"].items())
    return [
        f"--loadEngine={PLAN_FILE}",
        f"--shapes={check['shapes']}",
        f"--loadInputs={inputs}",
        f"--exportOutput={output}",
        "--iterations=1",
        "--warmUp=0",
        "--duration=0",
    ]


def read_exported(path: Path) -> list[dict]:
    """trtexec --exportOutput JSON, which writes non-finite values as bare nan/inf."""
    text = re.sub(r"\bnan\b", "NaN", path.read_text())
    return json.loads(re.sub(r"\binf\b", "Infinity", text))


def engine_cosines(exported: list[dict], check: dict, version_dir: Path) -> np.ndarray:
    """Row-wise cosine between the engine's output (trtexec --exportOutput) and the fp32 reference."""
    output = next((o for o in exported if o["name"] == check["output"]), None)
    if output is None:
        raise ExportError(f"the engine has no output {check['output']!r}: rebuild the ONNX with this ecomserve")
    actual = np.asarray(output["values"], dtype=np.float32).reshape(-1, check["dim"])
    expected = np.frombuffer((version_dir / check["expected"]).read_bytes(), dtype="<f4").reshape(-1, check["dim"])
    norms = np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1)
    return np.sum(actual * expected, axis=1) / np.maximum(norms, 1e-12)


def write_calibration_cache(onnx_path: Path, batches: Iterable[dict[str, np.ndarray]], target: Path) -> int:
    """TensorRT INT8 scales (max |activation| / 127 per tensor) from ONNX Runtime's calibrator on
    shipped text, in the cache format trtexec --calib reads. Returns the number of tensors."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    from ecomserve.export.compress import CalibrationReader

    with tempfile.TemporaryDirectory(prefix="ecomserve-calibrate-") as work:
        calibrator = create_calibrator(
            onnx_path,
            None,
            augmented_model_path=str(Path(work) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.MinMax,
        )
        calibrator.collect_data(CalibrationReader(list(batches)))
        ranges = calibrator.compute_data()
    release = "".join(f"{int(part):02d}" for part in TENSORRT_RELEASE.split("."))
    lines = [f"TRT-{int(release)}-EntropyCalibration2"]
    for name, data in sorted(ranges.items()):
        low, high = (float(np.asarray(v).reshape(-1)[0]) for v in data.range_value)
        bound = max(abs(low), abs(high))
        if not 0 < bound <= FP16_MAX:
            # The attention mask's -3.4e38 (and constants): no INT8 scale; TensorRT keeps them unquantized.
            continue
        lines.append(f"{name}: {struct.pack('>f', bound / 127.0).hex()}")
    target.write_text("\n".join(lines) + "\n")
    return len(lines) - 1


def find_trtexec() -> str | None:
    for candidate in (shutil.which("trtexec"), *TRTEXEC_PATHS):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def build_engines(repository: Path, log) -> list[Path]:
    """Build and check every plan listed in the repository's tensorrt_engines.json (needs trtexec and a GPU)."""
    trtexec = find_trtexec()
    if trtexec is None:
        raise ExportError("trtexec not found: run this inside nvcr.io/nvidia/tritonserver:24.10-py3 on the target GPU")
    plans = []
    for engine in json.loads((repository / ENGINES_FILE).read_text()):
        version_dir = repository / engine["model"] / engine["version"]
        log(f"building {engine['model']}: trtexec {' '.join(engine['trtexecArgs'][:4])} …")
        _trtexec(
            trtexec, [f"--onnx={engine['onnx']}", f"--saveEngine={PLAN_FILE}", *engine["trtexecArgs"]], version_dir
        )
        with tempfile.TemporaryDirectory(prefix="ecomserve-engine-check-") as work:
            output = Path(work) / CHECK_OUTPUT
            _trtexec(trtexec, check_args(engine["check"], output), version_dir)
            cosines = engine_cosines(read_exported(output), engine["check"], version_dir)
        if not cosines.min() >= engine["check"]["min_cosine"]:  # NaN fails too
            (version_dir / PLAN_FILE).unlink()
            raise ExportError(
                f"{engine['model']}: engine output differs from PyTorch fp32: min cosine {cosines.min():.6f} < "
                f"{engine['check']['min_cosine']}; the plan was removed. Try precision fp32 or fp16."
            )
        log(f"✓ {engine['model']}: min cosine to PyTorch fp32 {cosines.min():.6f} on {len(cosines)} texts")
        plans.append(version_dir / PLAN_FILE)
    return plans


def _trtexec(trtexec: str, args: list[str], cwd: Path) -> None:
    result = subprocess.run([trtexec, *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ExportError(
            f"trtexec failed (exit {result.returncode}) in {cwd}:\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
        )
