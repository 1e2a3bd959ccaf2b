"""One encoder from its spec to the files its target serves, with a parity check against PyTorch
after every stage that changes numbers:

- target cpu: prune → distil → ONNX → optimise or quantise → convert (or the torch weights as they are);
- GPU targets: prune → distil → fp32 ONNX, plus what TensorRT needs to build and check an engine."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.progress import Progress

from ecomserve.cpu import has_int8_dot_product
from ecomserve.errors import ExportError
from ecomserve.export import compress, tensorrt
from ecomserve.export.onnx_export import export_onnx
from ecomserve.export.parity import MIN_COSINE, ParityReport, check_parity, parity_texts
from ecomserve.export.pooled_encoder import PooledEncoder, load_encoder, reference_embeddings
from ecomserve.export.torchscript import export_torchscript
from ecomserve.paths import corpus_texts
from ecomserve.runtime import MODEL_FILES, TORCH_FP16_FILE, load_runner, torch_runner
from ecomserve.spec import GPU_TARGETS, EncoderSpec, PipelineSpec
from ecomserve.tokenization import TOKENIZER_FILE, TextTokenizer


def export_encoder(
    encoder: EncoderSpec,
    source: Path,
    target_dir: Path,
    progress: Progress | None = None,
    spec: PipelineSpec | None = None,
) -> dict:
    """Write the encoder's model file(s) into `target_dir`; returns what was checked on the way.
    `spec` (its serving target and shapes) matters for GPU targets; without one the target is cpu."""
    tokenizer = TextTokenizer(source / TOKENIZER_FILE, encoder.max_seq_len)
    reference = reference_model(encoder, source, tokenizer, progress)
    reports: list[ParityReport] = []

    def verify(stage: str, runner, precision: str) -> None:
        reports.append(check_parity(runner, reference.model, tokenizer, encoder.name, stage, MIN_COSINE[precision]))

    result = {"stages": reports, "distill_losses": reference.losses}
    target_dir.mkdir(parents=True, exist_ok=True)
    if encoder.runtime == "torch":
        _save_torch(encoder, reference.model, target_dir, verify)
        return _as_dicts(result)
    with tempfile.TemporaryDirectory(prefix="ecomserve-export-") as work:
        work_dir = Path(work)
        fp32 = work_dir / "fp32.onnx"
        export_onnx(reference.model, fp32)
        verify("onnx fp32", load_runner("onnxruntime", fp32, threads=2), "fp32")
        if spec is not None and spec.serving.target in GPU_TARGETS:
            shutil.copy2(fp32, target_dir / tensorrt.ONNX_FILE)
            if spec.serving.target == "tensorrt":
                result["engine"] = _engine_inputs(spec, encoder, reference.model, tokenizer, target_dir)
            return _as_dicts(result)
        final = _compress(encoder, fp32, work_dir, tokenizer, source, verify)
        if encoder.precision == "int8" and encoder.runtime == "onnxruntime":
            result["int8_recipe"] = int8_recipe(encoder)  # the build report says which CPU class it suits
        # The runtime loads MODEL_FILES[runtime]; OpenVINO's weights sit beside it with the same stem.
        stem = Path(MODEL_FILES[encoder.runtime]).stem
        for produced in final:
            shutil.copy2(produced, target_dir / f"{stem}{produced.suffix}")
    return _as_dicts(result)


def _as_dicts(result: dict) -> dict:
    return {**result, "stages": [asdict(r) for r in result["stages"]]}


def _save_torch(encoder: EncoderSpec, model: PooledEncoder, target_dir: Path, verify) -> None:
    """Traced fp32 (and fp16) graphs of the (pruned, distilled) model; fp16 is checked here on the CPU."""
    traces = [(MODEL_FILES["torch"], False)] + ([(TORCH_FP16_FILE, True)] if encoder.precision == "fp16" else [])
    for file, half in traces:
        export_torchscript(model, target_dir / file, half)
        precision = "fp16" if half else "fp32"
        verify(f"torch {precision}", torch_runner(target_dir / file, "cpu", threads=2), precision)


def _engine_inputs(
    spec: PipelineSpec, encoder: EncoderSpec, model: PooledEncoder, tokenizer: TextTokenizer, target_dir: Path
) -> dict:
    """What a GPU build needs beside model.onnx: the trtexec flags, the check inputs, INT8 scales."""
    onnx_path = target_dir / tensorrt.ONNX_FILE
    if encoder.precision == "int8":
        batches = compress.calibration_batches(tokenizer, corpus_texts())
        tensorrt.write_calibration_cache(onnx_path, batches, target_dir / tensorrt.CALIBRATION_CACHE)
    texts = parity_texts()[: spec.serving.dynamic_batching.max_batch_size]
    batch = tokenizer.encode(texts)
    expected = reference_embeddings(model, batch.input_ids, batch.attention_mask).numpy()
    check = tensorrt.write_check_files(target_dir, batch.input_ids, batch.attention_mask, expected)
    return {
        "onnx": tensorrt.ONNX_FILE,
        "trtexecArgs": tensorrt.trtexec_args(spec, encoder, onnx_path),
        "check": {**check, "min_cosine": MIN_COSINE[encoder.precision]},
    }


@dataclass(frozen=True)
class Reference:
    model: PooledEncoder
    losses: list[float] | None  # per distillation epoch, None when not distilled


def reference_model(
    encoder: EncoderSpec, source: Path, tokenizer: TextTokenizer, progress: Progress | None
) -> Reference:
    """The PyTorch model every stage is checked against: pruned and, if asked, distilled."""
    try:
        model = PooledEncoder(load_encoder(source, encoder.keep_layers, encoder.layer_indices), encoder.pooling)
    except Exception as exc:  # noqa: BLE001 - unreadable weights raise whatever their format's reader raises
        raise ExportError(f"encoders[{encoder.name}]: cannot load {source}: {exc}") from exc
    if encoder.distill is None:
        return Reference(model, None)
    from ecomserve.export.distill import distill
    from ecomserve.export.distill_corpus import training_texts

    teacher = PooledEncoder(load_encoder(source, None), encoder.pooling)
    # Parity and eval texts stay out of training: the checks and the quality numbers see text the student never fitted.
    result = distill(model, teacher, tokenizer, training_texts(encoder.distill), encoder.distill, progress)
    return Reference(model, result.losses)


def int8_recipe(encoder: EncoderSpec) -> str:
    """The spec's int8_recipe, `auto` resolved for the CPU this build runs on (serve on the same CPU class)."""
    if encoder.int8_recipe != "auto":
        return encoder.int8_recipe
    return "full_range" if has_int8_dot_product() else "reduced_range"


def _compress(encoder: EncoderSpec, fp32: Path, work_dir: Path, tokenizer, source: Path, verify) -> list[Path]:
    """The files the runtime loads, after the stages the spec asks for."""
    calibration = None
    if encoder.precision == "int8":
        calibration = list(compress.calibration_batches(tokenizer, corpus_texts()))
    if encoder.runtime == "openvino":
        xml = compress.to_openvino(fp32, work_dir / "model.xml", calibration)
        verify(f"openvino {encoder.precision}", load_runner("openvino", xml, threads=2), encoder.precision)
        return [xml, xml.with_suffix(".bin")]
    if encoder.precision == "int8":
        reduce = int8_recipe(encoder) == "reduced_range"
        quantized = compress.quantize_static_onnx(fp32, work_dir / "int8.onnx", calibration, reduce_range=reduce)
        verify("onnxruntime int8 static", load_runner("onnxruntime", quantized, threads=2), "int8")
        return [quantized]
    if encoder.optimize:
        config = json.loads((source / "config.json").read_text())
        optimized = compress.optimize_onnx(
            fp32, work_dir / "optimized.onnx", config["num_attention_heads"], config["hidden_size"]
        )
        verify("onnxruntime fp32 optimized", load_runner("onnxruntime", optimized, threads=2), "fp32")
        return [optimized]
    return [fp32]
