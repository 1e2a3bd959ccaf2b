"""One encoder from its spec to the file the runtime serves: prune → distil → ONNX → optimise or
quantise → convert, with a parity check against PyTorch after every stage that changes numbers."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.progress import Progress

from ecomserve.errors import ExportError
from ecomserve.export import compress
from ecomserve.export.onnx_export import export_onnx
from ecomserve.export.parity import MIN_COSINE, ParityReport, check_parity, parity_texts
from ecomserve.export.pooled_encoder import PooledEncoder, load_encoder
from ecomserve.paths import corpus_texts
from ecomserve.runtime import MODEL_FILES, load_runner
from ecomserve.spec import EncoderSpec
from ecomserve.tokenization import TOKENIZER_FILE, TextTokenizer


def export_encoder(encoder: EncoderSpec, source: Path, target_dir: Path, progress: Progress | None = None) -> dict:
    """Write the encoder's model file(s) into `target_dir`; returns what was checked on the way."""
    tokenizer = TextTokenizer(source / TOKENIZER_FILE, encoder.max_seq_len)
    reference = _reference(encoder, source, tokenizer, progress)
    reports: list[ParityReport] = []
    with tempfile.TemporaryDirectory(prefix="ecomserve-export-") as work:
        work_dir = Path(work)
        fp32 = work_dir / "fp32.onnx"
        export_onnx(reference.model, fp32)

        def verify(stage: str, runtime: str, path: Path, precision: str) -> None:
            runner = load_runner(runtime, path, threads=2)
            reports.append(check_parity(runner, reference.model, tokenizer, encoder.name, stage, MIN_COSINE[precision]))

        verify("onnx fp32", "onnxruntime", fp32, "fp32")
        final = _compress(encoder, fp32, work_dir, tokenizer, source, verify)
        target_dir.mkdir(parents=True, exist_ok=True)
        # The runtime loads MODEL_FILES[runtime]; OpenVINO's weights sit beside it with the same stem.
        stem = Path(MODEL_FILES[encoder.runtime]).stem
        for produced in final:
            shutil.copy2(produced, target_dir / f"{stem}{produced.suffix}")
    return {"stages": [asdict(r) for r in reports], "distill_losses": reference.losses}


@dataclass(frozen=True)
class _Reference:
    model: PooledEncoder
    losses: list[float] | None  # per distillation epoch, None when not distilled


def _reference(encoder: EncoderSpec, source: Path, tokenizer: TextTokenizer, progress: Progress | None) -> _Reference:
    """The PyTorch model every stage is checked against: pruned and, if asked, distilled."""
    try:
        model = PooledEncoder(load_encoder(source, encoder.keep_layers), encoder.pooling)
    except (OSError, ValueError) as exc:
        raise ExportError(f"encoders[{encoder.name}]: cannot load {source}: {exc}") from exc
    if encoder.distill is None:
        return _Reference(model, None)
    from ecomserve.export.distill import distill

    teacher = PooledEncoder(load_encoder(source, None), encoder.pooling)
    # The parity texts stay out of training, so the checks see text the student never fitted.
    held_out = set(parity_texts())
    texts = [t for t in corpus_texts() if t not in held_out]
    losses = distill(model, teacher, tokenizer, texts, encoder.distill, progress)
    return _Reference(model, losses)


def _compress(encoder: EncoderSpec, fp32: Path, work_dir: Path, tokenizer, source: Path, verify) -> list[Path]:
    """The files the runtime loads, after the stages the spec asks for."""
    calibration = None
    if encoder.precision == "int8":
        calibration = list(compress.calibration_batches(tokenizer, corpus_texts()))
    if encoder.runtime == "openvino":
        xml = compress.to_openvino(fp32, work_dir / "model.xml", calibration)
        verify(f"openvino {encoder.precision}", "openvino", xml, encoder.precision)
        return [xml, xml.with_suffix(".bin")]
    if encoder.precision == "int8":
        quantized = compress.quantize_static_onnx(fp32, work_dir / "int8.onnx", calibration)
        verify("onnxruntime int8 static", "onnxruntime", quantized, "int8")
        return [quantized]
    if encoder.optimize:
        config = json.loads((source / "config.json").read_text())
        optimized = compress.optimize_onnx(
            fp32, work_dir / "optimized.onnx", config["num_attention_heads"], config["hidden_size"]
        )
        verify("onnxruntime fp32 optimized", "onnxruntime", optimized, "fp32")
        return [optimized]
    return [fp32]
