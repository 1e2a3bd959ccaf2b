"""The variant table's quality columns and the rule that picks the default (issue 18): classify accuracy on the eval
set, and the fastest servable variant within 0.01 NDCG@5 and 0.02 classify accuracy of PyTorch fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ecomserve.bench.run import fastest_within_bounds, served_variant_name
from ecomserve.bench.variants import VARIANTS, architecture, variant_spec
from ecomserve.evaluation import EvalSet, classify_accuracy
from ecomserve.spec import EncoderSpec, load_spec


def test_classify_accuracy_is_the_share_of_titles_nearest_their_own_category():
    eval_set = EvalSet(
        product_ids=["p1", "p2", "p3", "p4"],
        titles=["red shoe", "blue shoe", "kettle", "toaster"],
        categories=["shoes", "shoes", "kitchen", "kitchen"],
        category_names=["shoes", "kitchen"],
        queries=[],
    )
    vectors = {
        "shoes": [1.0, 0.0],
        "kitchen": [0.0, 1.0],
        "red shoe": [0.9, 0.1],
        "blue shoe": [0.2, 0.8],  # nearer kitchen: the one miss
        "kettle": [0.1, 0.9],
        "toaster": [0.3, 0.7],
    }

    def embed(texts: list[str]) -> np.ndarray:
        return np.array([vectors[t] for t in texts])

    assert classify_accuracy(eval_set, embed) == 0.75


def _variant(
    name: str, servable: bool, ndcg5: float, classify: float, speed: float, cosine: float = 0.9, arch: str = ""
) -> dict:
    quality = {"ndcg5": ndcg5, "classify_accuracy": classify, "cosine_min": cosine}
    return {"name": name, "architecture": arch or name, "servable": servable, "query_per_s": speed} | quality


def test_the_default_rule_takes_the_fastest_servable_variant_inside_both_bounds():
    results = {
        "reference_ndcg5": 0.80,
        "reference_classify": 0.60,
        "variants": [
            _variant("fp32", True, 0.80, 0.60, 100),
            _variant("int8 static", True, 0.795, 0.59, 200),
            _variant("dynamic", False, 0.81, 0.62, 900),  # batch-dependent: never served
            _variant("pruned", True, 0.78, 0.70, 800),  # loses 0.02 NDCG@5
            _variant("student", True, 0.83, 0.57, 700),  # loses 0.03 classify accuracy
        ],
    }
    assert fastest_within_bounds(results) == "int8 static"
    results["variants"].append(_variant("good student", True, 0.791, 0.581, 400))
    assert fastest_within_bounds(results) == "good student"
    results["reference_ndcg5"] = 0.95
    assert fastest_within_bounds(results) is None


def test_of_one_architecture_the_rule_takes_the_variant_nearest_the_full_model():
    """An untrained and a distilled student run the same graph: a faster reading of the untrained one is noise."""
    results = {
        "reference_ndcg5": 0.80,
        "reference_classify": 0.60,
        "variants": [
            _variant("int8 static", True, 0.80, 0.62, 500, cosine=0.98),
            _variant("L3 int8", True, 0.81, 0.68, 1347, cosine=0.54, arch="L3"),
            _variant("L3 distilled int8", True, 0.83, 0.63, 1218, cosine=0.72, arch="L3"),
        ],
    }
    assert fastest_within_bounds(results) == "L3 distilled int8"
    results["variants"][2]["ndcg5"] = 0.75  # out of bounds: the untrained one is the architecture's only fit
    assert fastest_within_bounds(results) == "L3 int8"
    assert architecture("L3 [0,4,5] int8") == architecture("L3 [0,4,5] distilled int8")
    assert architecture("L3 [0,4,5] int8") != architecture("int8 static onnxruntime")


def test_layer_choice_variants_keep_their_layers_and_the_others_keep_all():
    base = EncoderSpec(name="minilm", source="bundled:all-MiniLM-L6-v2", layer_indices=[0, 1])
    assert variant_spec(base, VARIANTS["L3 [0,4,5] int8"]).layer_indices == [0, 4, 5]
    distilled = variant_spec(base, VARIANTS["L3 [0,4,5] distilled int8"])
    assert distilled.layer_indices == [0, 4, 5] and distilled.distill.corpus_size == 8000
    full = variant_spec(base, VARIANTS["int8 static onnxruntime"])
    assert full.layer_indices is None and full.keep_layers is None and full.precision == "int8"


def _row(contender: str, workload: str, protocol: str, clients: int, per_s: float, p50: float) -> dict:
    return {
        "contender": contender,
        "workload": workload,
        "protocol": protocol,
        "concurrency": clients,
        "throughput_items": per_s,
        "p50_ms": p50,
    }


def test_a_bar_whose_point_was_not_measured_is_none_not_a_crash():
    """`--concurrency 1 4` leaves out the 16-client point the first bar reads."""
    from ecomserve.bench.run import done_checks

    rows = [
        _row("pytorch eager", "query embed", "in-process", 1, 50.0, 20.0),
        _row("pytorch eager", "batch embed 32", "in-process", 1, 200.0, 160.0),
        _row("in-process served variant (2 threads)", "rank 1+100", "in-process", 1, 500.0, 200.0),
        _row("in-process served variant (1 thread)", "query embed", "in-process", 1, 700.0, 1.4),
        _row("in-process served variant (2 threads)", "query embed", "in-process", 1, 800.0, 1.2),
        _row("in-process served variant (1 thread)", "batch embed 32", "in-process", 1, 500.0, 60.0),
        _row("in-process served variant (2 threads)", "batch embed 32", "in-process", 1, 480.0, 50.0),
        _row("served", "query embed", "grpc", 1, 120.0, 8.0),
        _row("served", "batch embed 32", "grpc", 1, 400.0, 80.0),
        _row("served", "batch embed 32", "grpc", 4, 600.0, 210.0),
        _row("served", "rank 1+100", "grpc", 1, 400.0, 250.0),
    ]
    results = {
        "measurements": rows,
        "variants": [_variant("int8 static", True, 0.80, 0.62, 300)],
        "served_variant": "int8 static",
        "reference_ndcg5": 0.80,
        "reference_classify": 0.60,
    }
    checks = done_checks(results)
    assert checks["served_query_c16_vs_torch_b1"] is None
    assert checks["served_batch32_vs_torch_b32"] == 600 / 200  # the best of the client counts measured
    assert checks["served_rank_p50_vs_in_process"] == 250 / 200
    # Issue 18's last bars, against the best in-process run: p50 1.2 ms (2 threads), 500 titles/s (1 thread).
    assert checks["served_query_c1_p50_grpc_over_in_process_ms"] == 8.0 - 1.2
    assert checks["served_batch32_c1_p50_grpc_over_in_process_ms"] == 80.0 - 50.0  # one client of 32 titles
    assert checks["served_batch32_c4_grpc_vs_in_process"] == 600 / 500
    assert checks["served_query_c1_p50_http_over_in_process_ms"] is None  # HTTP left out
    assert checks["served_batch32_c1_p50_http_over_in_process_ms"] is None
    assert checks["served_batch32_c4_http_vs_in_process"] is None
    assert checks["fastest_within_quality_bounds"] == "int8 static"


def test_the_default_spec_serves_the_distilled_student_variant():
    """The rule picked "L3 [0,4,5] distilled int8" (README, "Compression variants"): the default spec serves exactly
    that variant, so the bench reports it as the served one and measures the same build."""
    default = load_spec(Path(__file__).resolve().parents[1] / "export/default.yaml").encoders[0]
    assert served_variant_name(default) == "L3 [0,4,5] distilled int8"


def test_a_variant_built_by_other_export_code_is_rebuilt(tmp_path):
    import json

    from support import make_tiny_bert

    from ecomserve.bench.variants import build_variant, export_code_hash

    tiny = make_tiny_bert(tmp_path / "tiny", seed=5)
    base = EncoderSpec(name="tiny", source=str(tiny), max_seq_len=32)
    path, checks = build_variant("fp32 onnxruntime", base, tiny, tmp_path / "variant")
    assert checks["built_from"]["export_code"] == export_code_hash()
    built_at = path.stat().st_mtime_ns
    assert build_variant("fp32 onnxruntime", base, tiny, tmp_path / "variant")[0].stat().st_mtime_ns == built_at
    record = tmp_path / "variant" / "build.json"
    stale = json.loads(record.read_text())
    stale["built_from"]["export_code"] = "older code"
    record.write_text(json.dumps(stale))
    assert build_variant("fp32 onnxruntime", base, tiny, tmp_path / "variant")[0].stat().st_mtime_ns != built_at
