"""ecomserve.parameters: what the repository builder writes into a python model's config is what the
model reads back, typed, through the config JSON Triton hands the python stub."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToDict

from ecomserve.contract import CLASSIFY, EMBEDDER, FUSION, RANK, SEARCH, encoder_model, tokenizer_model
from ecomserve.fusion import EncoderSlice
from ecomserve.parameters import (
    EmbedderParameters,
    EncoderParameters,
    FusionParameters,
    SearchParameters,
    TokenizerParameters,
)
from ecomserve.repository.builder import plan
from ecomserve.repository.configs import all_configs
from ecomserve.spec import PromptsSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]


def stub_configs(layout: str, spec_file: str = "default.yaml") -> tuple[object, dict[str, dict]]:
    """The spec and each model's config as the python stub gets it (args["model_config"], parsed)."""
    spec = load_spec(ROOT / "export" / spec_file)
    spec = spec.model_copy(update={"serving": spec.serving.model_copy(update={"layout": layout})})
    built = [b for b, _ in plan(spec, ROOT / "export")]
    return spec, {c.name: MessageToDict(c, preserving_proto_field_name=True) for c in all_configs(spec, built)}


def test_the_fused_layouts_models_read_back_what_the_builder_wrote():
    spec, configs = stub_configs("fused")
    embedder = EmbedderParameters.from_config(configs[EMBEDDER])
    assert [e.name for e in embedder.encoders] == [e.name for e in spec.encoders]
    assert embedder.encoders[0].max_seq_len == spec.encoders[0].max_seq_len
    assert embedder.max_text_bytes == spec.limits.max_text_bytes and embedder.device == spec.serving.device
    assert embedder.intra_op_threads == spec.serving.intra_op_threads
    heads = {name: FusionParameters.from_config(configs[name]) for name in (RANK, CLASSIFY)}
    for head in heads.values():
        assert head.encoders == embedder.slices and all(isinstance(s, EncoderSlice) for s in head.encoders)
        assert head.fusion == spec.fusion.model_dump() and head.voting == spec.voting.model_dump()
        assert head.limits == spec.limits.model_dump()
        assert head.embed_batch == spec.serving.dynamic_batching.max_batch_size
    search = SearchParameters.from_config(configs[SEARCH])
    assert search.search == spec.search.model_dump() and search.layout == "fused"
    assert search.encoders == embedder.slices


def test_the_split_layouts_models_read_back_what_the_builder_wrote():
    spec, configs = stub_configs("ensemble", "ensemble.yaml")  # two encoders: a fusion step
    for encoder in spec.encoders:
        tokenizer = TokenizerParameters.from_config(configs[tokenizer_model(encoder.name)])
        assert (tokenizer.max_seq_len, tokenizer.max_text_bytes) == (encoder.max_seq_len, spec.limits.max_text_bytes)
        runner = EncoderParameters.from_config(configs[encoder_model(encoder.name)])
        assert runner.runtime == encoder.runtime and runner.device == spec.serving.device
    assert [s.name for s in FusionParameters.from_config(configs[FUSION]).encoders] == [e.name for e in spec.encoders]


def test_defaults_serve_older_repositories_and_a_missing_parameter_fails_the_load():
    config = {"parameters": {"max_seq_len": {"string_value": "64"}, "max_text_bytes": {"string_value": "4096"}}}
    assert TokenizerParameters.from_config(config).pad_to_multiple == 1
    config = {"parameters": {"runtime": {"string_value": "onnx"}, "model_file": {"string_value": "model.onnx"}}}
    with pytest.raises(KeyError, match="intra_op_threads"):
        EncoderParameters.from_config(config)


def test_a_string_parameter_is_never_json_decoded():
    written = EncoderParameters(runtime="onnx", model_file="1", intra_op_threads=2, device="cpu").to_parameters()
    expected = {"runtime": "onnx", "model_file": "1", "intra_op_threads": "2", "idle_threads": "null"}
    assert written == expected | {"pin_cores": "true", "spread_batches": "false", "device": "cpu"}
    read = EncoderParameters.from_config({"parameters": {k: {"string_value": v} for k, v in written.items()}})
    assert read.model_file == "1" and read.intra_op_threads == 2 and read.idle_threads is None


def test_prompts_reach_rank_and_search_and_embed_allows_their_room():
    spec, _ = stub_configs("fused")
    prompts = {"query": "query: ", "passage": "passage: "}
    encoders = [e.model_copy(update={"prompts": PromptsSpec(**prompts)}) for e in spec.encoders]
    spec = spec.model_copy(update={"encoders": encoders})
    for layout in ("fused", "ensemble"):
        laid_out = spec.model_copy(update={"serving": spec.serving.model_copy(update={"layout": layout})})
        built = [b for b, _ in plan(laid_out, ROOT / "export")]
        configs = {c.name: MessageToDict(c, preserving_proto_field_name=True) for c in all_configs(laid_out, built)}
        assert FusionParameters.from_config(configs[RANK]).prompts == prompts
        assert SearchParameters.from_config(configs[SEARCH]).prompts == prompts
        # Behind `embed`: the limit stays the spec's, plus the longest prompt's bytes.
        behind = (
            [EmbedderParameters.from_config(configs[EMBEDDER])]
            if layout == "fused"
            else [TokenizerParameters.from_config(configs[tokenizer_model(e.name)]) for e in spec.encoders]
        )
        for parameters in behind:
            assert (parameters.max_text_bytes, parameters.prompt_bytes) == (spec.limits.max_text_bytes, 9)
    _, plain = stub_configs("fused")
    assert FusionParameters.from_config(plain[RANK]).prompts == {}
    assert EmbedderParameters.from_config(plain[EMBEDDER]).prompt_bytes == 0


def test_repositories_built_before_prompts_load_without_them():
    _, configs = stub_configs("fused")
    for name, parameter in ((RANK, "prompts"), (SEARCH, "prompts"), (EMBEDDER, "prompt_bytes")):
        del configs[name]["parameters"][parameter]
    assert FusionParameters.from_config(configs[RANK]).prompts == {}
    assert SearchParameters.from_config(configs[SEARCH]).prompts == {}
    assert EmbedderParameters.from_config(configs[EMBEDDER]).prompt_bytes == 0
