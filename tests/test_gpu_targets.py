"""GPU targets: generated repositories (tensorrt, onnxruntime) checked against the exported ONNX graph,
the TensorRT build inputs checked against the spec, and the torch encoder's device selection.

No GPU and no TensorRT exist on the CI machine: engine building runs only where trtexec is found and
is skipped, with the reason, everywhere else."""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from support import TorchReference, client_for, cosine_rows, make_tiny_bert, spec_from, start_server
from tritonclient.grpc import model_config_pb2 as pb

from ecomserve.errors import SpecError
from ecomserve.export import tensorrt
from ecomserve.export.parity import MIN_COSINE, parity_texts
from ecomserve.repository.builder import build_repository
from ecomserve.repository.configs import parse_pbtxt
from ecomserve.runtime import ENCODER_INPUTS, ENCODER_OUTPUT, select_device
from ecomserve.tokenization import TOKENIZER_FILE, TextTokenizer

ONNX_TO_TRITON = {onnx.TensorProto.INT64: pb.TYPE_INT64, onnx.TensorProto.FLOAT: pb.TYPE_FP32}
SHAPES = {"max_batch_size": 16, "preferred_batch_size": [4, 8]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("gpu") / "tiny", seed=7)


def gpu_spec(tiny: Path, target: str, precision: str, **gpu):
    return spec_from(
        {
            "encoders": [{"name": "tiny", "source": str(tiny), "precision": precision, "max_seq_len": 48}],
            "serving": {"target": target, "dynamic_batching": SHAPES, "gpu": {"opt_seq_len": 64, **gpu}},
        }
    )


@pytest.fixture(scope="module")
def repositories(tiny, tmp_path_factory) -> dict[tuple[str, str], Path]:
    built = {}
    for target, precision in [
        ("tensorrt", "fp32"),
        ("tensorrt", "fp16"),
        ("tensorrt", "int8"),
        ("onnxruntime", "fp16"),
    ]:
        repository = tmp_path_factory.mktemp(f"{target}_{precision}") / "model_repository"
        build_repository(gpu_spec(tiny, target, precision), repository)
        built[(target, precision)] = repository
    return built


def configs(repository: Path) -> dict[str, pb.ModelConfig]:
    return {p.parent.name: parse_pbtxt(p.read_text()) for p in repository.glob("*/config.pbtxt")}


@pytest.mark.parametrize("key", [("tensorrt", "int8"), ("onnxruntime", "fp16")])
def test_encoder_config_matches_the_onnx_graph(repositories, key):
    """Names, dtypes and dims of the encoder model are the exported graph's, batch dimension aside."""
    repository = repositories[key]
    config = configs(repository)["tiny_encoder"]
    graph = onnx.load(str(repository / "tiny_encoder" / "1" / "model.onnx")).graph

    def from_onnx(values):
        return {
            v.name: (
                ONNX_TO_TRITON[v.type.tensor_type.elem_type],
                [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim][1:],
            )
            for v in values
        }

    def from_config(tensors):
        return {t.name: (t.data_type, list(t.dims)) for t in tensors}

    assert from_config(config.input) == from_onnx(graph.input) == {n: (pb.TYPE_INT64, [-1]) for n in ENCODER_INPUTS}
    assert from_config(config.output) == from_onnx(graph.output) == {ENCODER_OUTPUT: (pb.TYPE_FP32, [32])}
    assert config.max_batch_size == SHAPES["max_batch_size"]
    assert [g.kind for g in config.instance_group] == [pb.ModelInstanceGroup.KIND_GPU]
    assert not any(t.allow_ragged_batch for t in config.input)  # GPU backends batch equal shapes only
    assert config.platform == {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx"}[key[0]]


def test_tokenizer_and_heads_are_the_cpu_targets(repositories, tiny, tmp_path):
    """Only the encoder model changes with the target; the python models are configured identically."""
    cpu_repository = tmp_path / "cpu"
    cpu_spec = gpu_spec(tiny, "tensorrt", "fp32").model_copy(deep=True)
    cpu_spec = spec_from({**cpu_spec.model_dump(), "serving": {**cpu_spec.serving.model_dump(), "target": "cpu"}})
    build_repository(cpu_spec, cpu_repository)
    cpu, gpu = configs(cpu_repository), configs(repositories[("tensorrt", "fp32")])
    assert set(cpu) == set(gpu) == {"tiny_tokenizer", "tiny_encoder", "embed", "rank", "classify"}
    for name in ("embed", "rank", "classify"):
        assert cpu[name] == gpu[name], name
    cpu_params, gpu_params = dict(cpu["tiny_tokenizer"].parameters), dict(gpu["tiny_tokenizer"].parameters)
    assert cpu_params.pop("pad_to_multiple").string_value == "1"
    assert gpu_params.pop("pad_to_multiple").string_value == "8"
    assert cpu_params == gpu_params


def test_onnxruntime_target_uses_tensorrt_provider_with_the_spec_profile(repositories):
    config = configs(repositories[("onnxruntime", "fp16")])["tiny_encoder"]
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    parameters = dict(accelerator.parameters)
    assert accelerator.name == "tensorrt"
    assert parameters["precision_mode"] == "FP16" and parameters["trt_layer_norm_fp32_fallback"] == "1"
    assert parameters["trt_engine_cache_enable"] == "1"
    assert parameters["trt_engine_cache_path"] == "/var/cache/ecomserve/tensorrt/tiny_encoder"
    assert parameters["max_workspace_size_bytes"] == str(4096 << 20)
    # opt_seq_len 64 is clamped to the encoder's max_seq_len 48; opt batch is the largest preferred size
    assert parameters["trt_profile_min_shapes"] == "input_ids:1x1,attention_mask:1x1"
    assert parameters["trt_profile_opt_shapes"] == "input_ids:8x48,attention_mask:8x48"
    assert parameters["trt_profile_max_shapes"] == "input_ids:16x48,attention_mask:16x48"


def engine_entry(repository: Path) -> dict:
    (entry,) = json.loads((repository / tensorrt.ENGINES_FILE).read_text())
    return entry


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_build_command_follows_the_spec(repositories, precision):
    repository = repositories[("tensorrt", precision)]
    entry = engine_entry(repository)
    version_dir = repository / entry["model"] / entry["version"]
    args = entry["trtexecArgs"]
    assert (entry["model"], entry["version"], entry["onnx"]) == ("tiny_encoder", "1", "model.onnx")
    assert (version_dir / entry["onnx"]).is_file()
    assert args[:4] == [
        "--minShapes=input_ids:1x1,attention_mask:1x1",
        "--optShapes=input_ids:8x48,attention_mask:8x48",
        "--maxShapes=input_ids:16x48,attention_mask:16x48",
        "--memPoolSize=workspace:4096M",
    ]
    assert ("--fp16" in args) == (precision != "fp32")
    assert ("--int8" in args) == (precision == "int8")
    assert entry["check"]["min_cosine"] == MIN_COSINE[precision]
    if precision == "fp32":
        assert not any(a.startswith("--layerPrecisions") for a in args)
        return
    graph = onnx.load(str(version_dir / entry["onnx"])).graph
    kept = {
        a.split(":")[0] for a in next(a for a in args if a.startswith("--layerPrecisions=")).split("=", 1)[1].split(",")
    }
    sensitive = {n.name for n in graph.node if n.op_type in {"LayerNormalization", "Softmax", "ReduceL2", "ReduceSum"}}
    assert sensitive and sensitive <= kept
    mask_adds = {n.name for n in graph.node for s in graph.node if s.op_type == "Softmax" and n.output[0] in s.input}
    assert mask_adds <= kept
    assert "--precisionConstraints=obey" in args


def test_int8_calibration_cache_is_tensorrts_format(repositories):
    repository = repositories[("tensorrt", "int8")]
    entry = engine_entry(repository)
    version_dir = repository / entry["model"] / entry["version"]
    assert f"--calib={tensorrt.CALIBRATION_CACHE}" in entry["trtexecArgs"]
    header, *lines = (version_dir / tensorrt.CALIBRATION_CACHE).read_text().splitlines()
    assert header == "TRT-100500-EntropyCalibration2"
    entries = (line.split(": ") for line in lines)
    scales = {name: struct.unpack(">f", bytes.fromhex(value))[0] for name, value in entries}
    assert all(0 < s <= tensorrt.FP16_MAX / 127 for s in scales.values())
    graph = onnx.load(str(version_dir / entry["onnx"])).graph
    weights = {i.name for i in graph.initializer}
    matmul_inputs = {i for n in graph.node if n.op_type == "MatMul" for i in n.input if i not in weights}
    assert matmul_inputs <= set(scales)  # every activation an INT8 MatMul reads has a scale


def test_engine_check_files_hold_pytorch_reference(repositories, tiny, tmp_path):
    """The post-build check compares an engine with fp32 PyTorch on the parity texts."""
    repository = repositories[("tensorrt", "fp16")]
    entry = engine_entry(repository)
    check, version_dir = entry["check"], repository / entry["model"] / entry["version"]
    batch, sequence = (int(x) for x in check["shapes"].split(",")[0].split(":")[1].split("x"))
    assert batch == min(len(parity_texts()), SHAPES["max_batch_size"]) and sequence <= 48
    ids = np.frombuffer((version_dir / check["inputs"]["input_ids"]).read_bytes(), "<i8").reshape(batch, sequence)
    expected = np.frombuffer((version_dir / check["expected"]).read_bytes(), "<f4").reshape(batch, check["dim"])
    reference = TorchReference(str(tiny), max_seq_len=48).embed(parity_texts()[:batch])
    np.testing.assert_allclose(expected, reference, atol=1e-6)
    assert ids.shape == (batch, sequence)

    def exported(rows: np.ndarray) -> list[dict]:
        return [{"name": ENCODER_OUTPUT, "dimensions": f"{batch}x{check['dim']}", "values": rows.ravel().tolist()}]

    assert tensorrt.engine_cosines(exported(expected), check, version_dir).min() > 0.99999
    noisy = expected + np.random.default_rng(0).normal(0, 0.2, expected.shape).astype(np.float32)
    assert tensorrt.engine_cosines(exported(noisy), check, version_dir).min() < check["min_cosine"]
    # trtexec writes an overflowed output as bare nan, which must parse and must fail the check
    written = tmp_path / "output.json"
    written.write_text(json.dumps(exported(expected)).replace(str(float(expected[0, 0])), "nan", 1))
    cosines = tensorrt.engine_cosines(tensorrt.read_exported(written), check, version_dir)
    assert np.isnan(cosines[0]) and not cosines.min() >= check["min_cosine"]


@pytest.mark.gpu
@pytest.mark.skipif(tensorrt.find_trtexec() is None, reason="TensorRT (trtexec) is not installed: no GPU build here")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engines_build_and_match_pytorch(repositories, precision):
    plans = tensorrt.build_engines(repositories[("tensorrt", precision)], print)
    assert all(p.is_file() for p in plans)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ecomserve", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.skipif(tensorrt.find_trtexec() is not None, reason="trtexec is installed: engines would be built")
def test_build_without_tensorrt_writes_repository_and_says_where_to_build(tiny, tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(json.dumps({"encoders": [{"name": "tiny", "source": str(tiny), "precision": "fp16"}]}))
    built = run_cli("build", "--spec", str(spec_file), "--repository", "repo", "--target", "tensorrt", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    message = " ".join(built.stderr.split())
    assert "TensorRT engines not built" in message and "nvcr.io/nvidia/tritonserver:24.10-py3" in message
    assert (tmp_path / "repo" / tensorrt.ENGINES_FILE).is_file()
    served = run_cli("serve", "--repository", "repo", cwd=tmp_path)
    assert served.returncode == 1
    assert "built for target tensorrt" in " ".join(served.stderr.split())


@pytest.mark.parametrize(
    "encoder, serving, message",
    [
        ({"precision": "fp16"}, {}, "fp16 needs a GPU"),
        ({"runtime": "openvino"}, {"target": "tensorrt"}, "runtime openvino applies to target cpu only"),
        ({"precision": "int8"}, {"target": "onnxruntime"}, "use target tensorrt"),
        ({"optimize": True}, {"target": "tensorrt"}, "GPU targets build from plain ONNX"),
        ({}, {"target": "tensorrt", "layout": "fused"}, "use layout ensemble"),
        ({}, {"device": "cuda"}, "serving.device applies to runtime torch"),
        ({"runtime": "torch", "precision": "int8"}, {}, "runtime torch serves fp32 or fp16"),
    ],
)
def test_spec_refuses_what_a_target_cannot_run(encoder, serving, message):
    with pytest.raises(SpecError, match=message):
        spec_from({"encoders": [{"name": "m", "source": "x", **encoder}], "serving": serving})


def test_gpu_targets_default_to_the_ensemble_layout():
    assert spec_from({"encoders": [{"name": "m", "source": "x"}]}).serving.layout == "fused"
    assert spec_from(
        {"encoders": [{"name": "m", "source": "x"}], "serving": {"target": "tensorrt"}}
    ).serving.layout == ("ensemble")


def test_padding_to_a_multiple_stops_at_max_seq_len(tiny):
    tokenizer = TextTokenizer(tiny / TOKENIZER_FILE, max_seq_len=12, pad_to_multiple=8)
    assert tokenizer.encode(["shoes"]).input_ids.shape == (1, 8)
    assert tokenizer.encode(["red trail running shoes for men with a waterproof lining"]).input_ids.shape == (1, 12)
    assert tokenizer.encode(["word " * 40]).input_ids.shape == (1, 12)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present: the fallback is not taken")
def test_device_selection_without_a_gpu(caplog):
    assert select_device("cpu") == "cpu"
    with caplog.at_level(logging.WARNING, logger="ecomserve.runtime"):
        assert select_device("auto") == "cpu"
    assert "sees no CUDA device" in caplog.text
    with pytest.raises(RuntimeError, match="serving.device is cuda but .* set serving.device: auto"):
        select_device("cuda")


@pytest.fixture(scope="module")
def torch_server(tiny, tmp_path_factory):
    """A torch fp16 encoder with device auto: on a GPU machine it runs CUDA fp16, here CPU fp32."""
    spec = spec_from(
        {
            "encoders": [{"name": "tiny", "source": str(tiny), "runtime": "torch", "precision": "fp16"}],
            "serving": {"device": "auto"},
        }
    )
    server = start_server(spec, tmp_path_factory.mktemp("torch"))
    yield server
    server.stop()


@pytest.mark.integration
def test_torch_encoder_serves_pytorch_answers(torch_server, tiny, protocol):
    texts = parity_texts()[:12]
    with client_for(torch_server, protocol) as client:
        served = client.embed(texts)
    assert cosine_rows(served, TorchReference(str(tiny)).embed(texts)).min() >= MIN_COSINE["fp16"]
    import torch

    if not torch.cuda.is_available():
        assert "fp16 needs CUDA; running fp32 on CPU" in torch_server.log_path.read_text()
