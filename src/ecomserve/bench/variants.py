"""Compression variants of one encoder, built once and measured in-process: size, speed, quality.

Every variant is built by the same export pipeline as the repository (so it passed its parity
check), then measured on the same texts: short queries one at a time, titles in batches of 32,
NDCG@5 on the eval set, cosine to the fp32 PyTorch reference, and batch invariance."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecomserve.evaluation import EvalSet, classify_accuracy, mean_ndcg
from ecomserve.export.parity import parity_texts
from ecomserve.runtime import MODEL_FILES, Runner, load_runner, run_by_length
from ecomserve.spec import EncoderSpec
from ecomserve.tokenization import TOKENIZER_FILE, TextTokenizer

# name → changes to the spec's encoder; "dynamic" variants are measured but never served.
VARIANTS: dict[str, dict] = {
    "fp32 onnxruntime": {"precision": "fp32"},
    "fp32 onnxruntime fused-graph": {"precision": "fp32", "optimize": True},
    "int8 static onnxruntime": {"precision": "int8"},
    "int8 dynamic onnxruntime": {"precision": "fp32", "dynamic_int8": True},
    "fp32 openvino": {"precision": "fp32", "runtime": "openvino"},
    "int8 openvino": {"precision": "int8", "runtime": "openvino"},
    "L3 pruned fp32": {"precision": "fp32", "keep_layers": 3},
    "L3 distilled fp32": {"precision": "fp32", "keep_layers": 3, "distill": {}},
    "L3 distilled int8": {"precision": "int8", "keep_layers": 3, "distill": {}},
    # Layers 0, 4 and 5: the 3 of 6 whose output is nearest the teacher's on generated texts (README, "A 3-layer
    # student"); untrained, then distilled on 8,000 generated texts with the ranking term (resumable checkpoints):
    # the default spec's encoder (a test holds them equal).
    "L3 [0,4,5] int8": {"precision": "int8", "layer_indices": [0, 4, 5]},
    "L3 [0,4,5] distilled int8": {
        "precision": "int8",
        "layer_indices": [0, 4, 5],
        "distill": {
            "epochs": 2,
            "corpus_size": 8000,
            "ranking_weight": 1.0,
            "checkpoint_dir": "~/.cache/ecomserve/distill",
        },
    },
}


def architecture(name: str) -> str:
    """What decides a variant's speed: its changes less the training (a distilled model runs the same graph as an
    untrained one of the same layers)."""
    return json.dumps({k: v for k, v in VARIANTS[name].items() if k != "distill"}, sort_keys=True)


@dataclass(frozen=True)
class VariantResult:
    name: str
    architecture: str  # architecture(name)
    runtime: str
    precision: str
    layers: str
    servable: bool  # batch-independent answers (DESIGN.md "same input, same answer")
    size_mb: float
    query_per_s: float  # one short query per call, in-process, best of 1 and 2 threads
    titles_per_s: float  # batches of 32 titles, best of 1 and 2 threads
    ndcg5: float
    classify_accuracy: float  # the eval set's titles labelled with their category (evaluation.classify_accuracy)
    cosine_min: float  # to the fp32 PyTorch reference of the full model
    cosine_mean: float
    batch_max_abs_diff: float


def variant_spec(base: EncoderSpec, changes: dict) -> EncoderSpec:
    """The spec's encoder (same source, pooling, length) with only the variant's choices changed."""
    fields = base.model_dump() | {
        "runtime": "onnxruntime",
        "optimize": False,
        "keep_layers": None,
        "layer_indices": None,
        "distill": None,
    }
    fields |= {k: v for k, v in changes.items() if k != "dynamic_int8"}
    return EncoderSpec.model_validate(fields)


def export_code_hash() -> str:
    """The export and compression code's fingerprint: a cached variant built by other code is rebuilt."""
    from ecomserve import export

    files = sorted(Path(export.__file__).parent.glob("*.py"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def build_variant(name: str, base: EncoderSpec, source: Path, directory: Path, progress=None) -> tuple[Path, dict]:
    """Build (or reuse, when the spec, source and export code are the same) a variant's model file; returns its path
    and the build's checks."""
    from ecomserve.export import compress
    from ecomserve.export.pipeline import export_encoder

    changes = VARIANTS[name]
    encoder = variant_spec(base, changes)
    model_path = directory / MODEL_FILES[encoder.runtime]
    record = directory / "build.json"
    wanted = {
        "encoder": encoder.model_dump(exclude={"prompts"}),  # prompts: not in the file
        "source": str(source),
        "export_code": export_code_hash(),
    }
    if record.is_file() and model_path.is_file():
        built = json.loads(record.read_text())
        if built.get("built_from") == wanted:  # a changed spec or source is rebuilt, never reused
            return model_path, built
    shutil.rmtree(directory, ignore_errors=True)
    checks = export_encoder(encoder, source, directory, progress) | {"built_from": wanted}
    if changes.get("dynamic_int8"):
        fp32 = directory / "fp32.onnx"
        model_path.rename(fp32)
        compress.quantize_dynamic_onnx(fp32, model_path)
        fp32.unlink()
    record.write_text(json.dumps(checks, indent=2))
    return model_path, checks


class Workloads:
    """The texts every contender sees."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        queries: list[str],
        titles: list[str],
        eval_set: EvalSet,
        new_query: Callable[[], str],
    ):
        self.tokenizer = tokenizer
        self.queries = queries
        self.new_query = new_query  # the served single-query workload: a query no request of the run carried
        self.titles = titles
        self.eval_set = eval_set
        self.title_batches = [titles[i : i + 32] for i in range(0, len(titles) - 31, 32)]


def short_queries(tokenizer: TextTokenizer, texts: list[str], low: int = 8, high: int = 16) -> list[str]:
    """Texts of 8–16 tokens ([CLS] and [SEP] included): the single-query workload."""
    return [t for t in texts if low <= int(tokenizer.encode([t]).attention_mask.sum()) <= high]


def _embedder(runner: Runner, tokenizer: TextTokenizer):
    def embed(texts: list[str]) -> np.ndarray:
        batch = tokenizer.encode(texts)
        return run_by_length(runner, batch.input_ids, batch.attention_mask)

    return embed


def _rate(call, items: list, seconds: float = 3.0) -> float:
    """Items per second of `call` over `items`, cycling until `seconds` have passed."""
    call(items[0])
    done, count, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        item = items[done % len(items)]
        call(item)
        done += 1
        count += len(item) if isinstance(item, list) else 1
    return count / (time.perf_counter() - start)


def _layers(encoder: EncoderSpec) -> str:
    if encoder.layer_indices is not None:
        return str(list(encoder.layer_indices))
    return str(encoder.keep_layers) if encoder.keep_layers else "all"


def measure_variant(
    name: str, encoder: EncoderSpec, model_path: Path, source: Path, reference, work: Workloads
) -> VariantResult:
    """`reference(texts)` gives the fp32 PyTorch vectors of the full model."""
    tokenizer = TextTokenizer(source / TOKENIZER_FILE, encoder.max_seq_len)
    embedders = [_embedder(load_runner(encoder.runtime, model_path, threads=t), tokenizer) for t in (1, 2)]
    embed = embedders[1]
    texts = parity_texts() + work.eval_set.titles
    vectors, expected = embed(texts), reference(texts)
    cosines = (vectors * expected).sum(axis=1)
    probe = work.queries[0]
    alone = embed([probe])[0]
    in_batch = embed(work.titles[:31] + [probe])[31]
    ndcg = mean_ndcg(work.eval_set, lambda q, items: embed(items) @ embed([q])[0])
    size = sum(p.stat().st_size for p in model_path.parent.glob("model.*"))
    diff = float(np.abs(alone - in_batch).max())
    return VariantResult(
        name=name,
        architecture=architecture(name),
        runtime=encoder.runtime,
        precision="int8 dynamic" if VARIANTS[name].get("dynamic_int8") else encoder.precision,
        layers=_layers(encoder),
        servable=diff <= 1e-5,
        size_mb=size / 2**20,
        # INT8 kernels often run faster on one thread than on two; each variant gets its better figure.
        query_per_s=max(_rate(lambda q, e=e: e([q]), work.queries) for e in embedders),
        titles_per_s=max(_rate(e, work.title_batches) for e in embedders),
        ndcg5=ndcg,
        classify_accuracy=classify_accuracy(work.eval_set, embed),
        cosine_min=float(cosines.min()),
        cosine_mean=float(cosines.mean()),
        batch_max_abs_diff=diff,
    )
