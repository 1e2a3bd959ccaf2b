from pathlib import Path

import pytest

from ecomserve.errors import SpecError
from ecomserve.spec import load_spec, parse_spec, resolve_source

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_specs_load():
    default = load_spec(ROOT / "export/default.yaml")
    ensemble = load_spec(ROOT / "export/ensemble.yaml")
    assert [e.name for e in default.encoders] == ["minilm"]
    assert [(e.name, e.keep_layers, e.weight) for e in ensemble.encoders] == [
        ("minilm", None, 2.0),
        ("minilm_l3", 3, 1.0),
    ]


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"encoders": []}, "encoders"),
        ({"encoders": [{"name": "m", "source": "x", "pooling": "max"}]}, "encoders.0.pooling"),
        ({"encoders": [{"name": "m", "source": "x", "max_seq_len": 4}]}, "encoders.0.max_seq_len"),
        ({"encoders": [{"name": "Bad-Name", "source": "x"}]}, "encoders.0.name"),
        ({"encoders": [{"name": "embed", "source": "x"}]}, "encoders.0.name"),
        ({"encoders": [{"name": "m", "source": "x", "colour": "red"}]}, "encoders.0.colour"),
        ({"encoders": [{"name": "m", "source": "x"}, {"name": "m", "source": "y"}]}, "encoders"),
        ({"encoders": [{"name": "m", "source": "x"}], "fusion": {"mode": "sum"}}, "fusion.mode"),
        (
            {
                "encoders": [{"name": "m", "source": "x"}],
                "serving": {"dynamic_batching": {"preferred_batch_size": [128]}},
            },
            "serving.dynamic_batching",
        ),
    ],
)
def test_invalid_spec_names_the_field(raw, field):
    with pytest.raises(SpecError) as error:
        parse_spec(raw, origin="pipeline.yaml")
    assert f"pipeline.yaml: invalid spec: {field}" in str(error.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="spec not found"):
        load_spec(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("encoders: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


def test_sources_resolve_locally(tmp_path):
    assert (resolve_source("bundled:all-MiniLM-L6-v2") / "model.safetensors").is_file()
    with pytest.raises(SpecError, match="unknown bundled model"):
        resolve_source("bundled:bert-large")
    with pytest.raises(SpecError, match="not a Hugging Face model directory"):
        resolve_source("models/absent", relative_to=tmp_path)


E5_PROMPTS = {"query": "query: ", "passage": "passage: "}


def test_prompts_are_read_and_default_to_none():
    plain = parse_spec({"encoders": [{"name": "m", "source": "x"}]})
    assert plain.prompts == {} and plain.encoders[0].prompts.as_dict() == {}
    both = [{"name": name, "source": "x", "prompts": E5_PROMPTS} for name in ("a", "b")]
    assert parse_spec({"encoders": both}).prompts == E5_PROMPTS
    only_query = parse_spec({"encoders": [{"name": "m", "source": "x", "prompts": {"query": "query: "}}]})
    assert only_query.prompts == {"query": "query: "}  # an unset prompt is not there


@pytest.mark.parametrize(
    "prompts, message",
    [
        ({"document": "passage: "}, "encoders.0.prompts.document: Extra inputs are not permitted"),
        ({"query": "q" * 257}, "encoders.0.prompts.query: Value error, a prompt is at most 256 bytes"),
        ({"passage": "é" * 129}, "encoders.0.prompts.passage: Value error, a prompt is at most 256 bytes"),
        ({"query": 3}, "encoders.0.prompts.query: Input should be a valid string"),
    ],
)
def test_bad_prompts_name_the_field(prompts, message):
    with pytest.raises(SpecError) as error:
        parse_spec({"encoders": [{"name": "m", "source": "x", "prompts": prompts}]}, origin="pipeline.yaml")
    assert message in str(error.value)


@pytest.mark.parametrize("second", [{}, {"query": "query: "}, {"query": "query: ", "passage": "document: "}])
def test_encoders_with_different_prompts_are_refused_with_the_reason(second):
    encoders = [
        {"name": "e5", "source": "x", "prompts": E5_PROMPTS},
        {"name": "minilm", "source": "y", "prompts": second},
    ]
    with pytest.raises(SpecError) as error:
        parse_spec({"encoders": encoders}, origin="pipeline.yaml")
    message = str(error.value)
    assert "pipeline.yaml: invalid spec: encoders: " in message
    assert "encoders e5 and minilm have different prompts" in message
    assert "`embed` fuses every encoder and takes one text for all of them" in message


def test_prompts_load_from_yaml(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("encoders:\n  - name: e5\n    source: x\n    prompts: {query: 'query: ', passage: 'passage: '}\n")
    assert load_spec(path).prompts == E5_PROMPTS
