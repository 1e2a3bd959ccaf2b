"""The generated model configs, parsed back from the text the builder writes."""

import json
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as pb

from ecomserve.repository.builder import plan, write_configs
from ecomserve.repository.configs import all_configs, parse_pbtxt, to_pbtxt
from ecomserve.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def with_layout(spec, layout: str):
    return spec.model_copy(update={"serving": spec.serving.model_copy(update={"layout": layout})})


def built_configs(spec_file: str, layout: str | None = None) -> dict[str, pb.ModelConfig]:
    spec = load_spec(ROOT / "export" / spec_file)
    if layout:
        spec = with_layout(spec, layout)
    built = [b for b, _ in plan(spec, ROOT / "export")]
    return {c.name: parse_pbtxt(to_pbtxt(c)) for c in all_configs(spec, built)}


def tensors(entries) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in entries}


@pytest.mark.parametrize(
    "layout, internal",
    [
        ("fused", {"embedder"}),
        ("ensemble", {"minilm_tokenizer", "minilm_encoder", "minilm_l3_tokenizer", "minilm_l3_encoder", "fusion"}),
    ],
)
def test_public_models_match_the_design(layout, internal):
    configs = built_configs("ensemble.yaml", layout)
    assert set(configs) == {"embed", "rank", "classify"} | internal
    embed, rank, classify = configs["embed"], configs["rank"], configs["classify"]
    assert tensors(embed.input) == {"TEXT": ("TYPE_STRING", [1])}
    assert tensors(embed.output) == {"EMBEDDING": ("TYPE_FP32", [768])}
    assert embed.max_batch_size == 64 and embed.response_cache.enable
    assert tensors(rank.input) == {"QUERY": ("TYPE_STRING", [1]), "CANDIDATES": ("TYPE_STRING", [-1])}
    assert tensors(rank.output) == {"SCORES": ("TYPE_FP32", [-1]), "ENCODER_SCORES": ("TYPE_FP32", [2, -1])}
    assert tensors(classify.input) == {"TEXT": ("TYPE_STRING", [1]), "LABELS": ("TYPE_STRING", [-1])}
    assert tensors(classify.output) == {
        "LABEL": ("TYPE_STRING", [1]),
        "VOTES": ("TYPE_INT32", [-1]),
        "SCORES": ("TYPE_FP32", [-1]),
    }


def test_search_and_similar_come_with_the_specs_search_section():
    configs = built_configs("default.yaml")
    similar, search = configs["similar"], configs["search"]
    assert tensors(similar.input) == {
        "ITEM_IDS": ("TYPE_STRING", [-1]),
        "TOP_K": ("TYPE_INT32", [1]),
        "FILTER": ("TYPE_STRING", [1]),
        "DIVERSITY": ("TYPE_FP32", [1]),  # MMR, overriding search.diversity per request
    }
    assert [t.optional for t in similar.input] == [False, True, True, True]
    # search: MODE (hybrid | dense | lexical) overrides search.mode per request.
    assert tensors(search.input) == {
        "QUERY": ("TYPE_STRING", [1]),
        "TOP_K": ("TYPE_INT32", [1]),
        "FILTER": ("TYPE_STRING", [1]),
        "MODE": ("TYPE_STRING", [1]),
    }
    assert [t.optional for t in search.input] == [False, True, True, True]
    outputs = {"IDS": ("TYPE_STRING", [-1]), "SCORES": ("TYPE_FP32", [-1]), "TITLES": ("TYPE_STRING", [-1])}
    assert tensors(similar.output) == tensors(search.output) == outputs
    assert similar.backend == "python" and similar.max_batch_size == 0
    # The same parameters as search's: both read the one index the spec's search section names.
    assert similar.parameters == search.parameters
    assert "similar" not in built_configs("ensemble.yaml")  # no search section, no similar


def test_ensemble_steps_are_wired():
    """Every tensor a step reads was produced before it; the last step produces EMBEDDING."""
    configs = built_configs("ensemble.yaml", "ensemble")
    available = {"TEXT"}
    for step in configs["embed"].ensemble_scheduling.step:
        model = configs[step.model_name]
        assert set(step.input_map) == {t.name for t in model.input}
        assert set(step.input_map.values()) <= available
        assert set(step.output_map) == {t.name for t in model.output}
        available |= set(step.output_map.values())
    assert step.model_name == "fusion" and step.output_map["EMBEDDING"] == "EMBEDDING"


def test_single_encoder_skips_the_fusion_hop():
    configs = built_configs("default.yaml", "ensemble")
    assert "fusion" not in configs
    steps = configs["embed"].ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["minilm_tokenizer", "minilm_encoder"]
    assert steps[-1].output_map["embedding"] == "EMBEDDING"


def test_encoder_batches_ragged_requests_and_warms_up():
    encoder = built_configs("teacher.yaml", "ensemble")["minilm_encoder"]  # the spec with a batching delay
    assert all(t.allow_ragged_batch for t in encoder.input)
    assert list(encoder.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert encoder.dynamic_batching.max_queue_delay_microseconds == 500
    assert encoder.instance_group[0].count == 2 and encoder.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert encoder.parameters["intra_op_threads"].string_value == "1"
    assert [w.batch_size for w in encoder.model_warmup] == [1, 64]


def test_fused_embed_is_one_batched_model_with_bounded_queue():
    configs = built_configs("ensemble.yaml")
    steps = configs["embed"].ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["embedder"] and configs["embed"].response_cache.enable
    embed = configs["embedder"]
    assert embed.backend == "python" and embed.max_batch_size == 64 and not embed.response_cache.enable
    queue = embed.dynamic_batching.default_queue_policy
    assert queue.max_queue_size == 256 and queue.timeout_action == pb.ModelQueuePolicy.REJECT
    assert queue.default_timeout_microseconds == 2_000_000
    encoders = json.loads(embed.parameters["encoders"].string_value)
    assert [(e["name"], e["weight"], e["dim"]) for e in encoders] == [("minilm", 2.0, 384), ("minilm_l3", 1.0, 384)]
    assert [w.batch_size for w in embed.model_warmup] == [1]


def test_repository_layout(tmp_path):
    spec = load_spec(ROOT / "export/default.yaml")
    built = [b for b, _ in plan(spec, ROOT / "export")]
    write_configs(spec, built, tmp_path)
    for name in ("embedder", "rank", "classify"):
        assert (tmp_path / name / "1" / "model.py").is_file()
        assert parse_pbtxt((tmp_path / name / "config.pbtxt").read_text()).name == name
    ensemble = tmp_path / "ensemble"
    write_configs(with_layout(spec, "ensemble"), built, ensemble)
    assert (ensemble / "minilm_encoder" / "1" / "model.py").is_file()
    assert not (ensemble / "embed" / "1" / "model.py").exists()  # an ensemble has no code
