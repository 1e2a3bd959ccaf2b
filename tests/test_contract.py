"""ecomserve.contract: the names every part agrees on, and the generated copy the chart's reload Job
script carries (it runs without ecomserve installed)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ecomserve import contract
from ecomserve.errors import RepositoryError
from ecomserve.repository.releases import check_compatible, versioned_models
from ecomserve.spec import RESERVED_NAMES

RELOAD_SCRIPT = Path(__file__).resolve().parents[1] / "k8s" / "chart" / "ecomserve" / "files" / "reload_models.py"


def _script_constants(text: str) -> dict[str, object]:
    """The script's top-level NAME = literal assignments."""
    constants = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return constants


def test_the_reload_scripts_generated_block_is_current():
    text = RELOAD_SCRIPT.read_text()
    assert contract.with_script_block(text) == text, (
        f"the generated block differs from ecomserve.contract; run python -m ecomserve.contract --write {RELOAD_SCRIPT}"
    )
    assert text.count(contract.BEGIN) == 1 and text.count(contract.END) == 1


def test_the_reload_script_skips_the_contracts_unversioned_models_and_loads_embed_last():
    script = RELOAD_SCRIPT.read_text()
    constants = _script_constants(script)
    assert set(constants["UNVERSIONED"]) == contract.UNVERSIONED == {"rank", "classify", "search", "similar"}
    assert constants["ADMIN_HEADER"] == contract.ADMIN_HEADER
    assert constants["EMBED"] == contract.EMBED
    namespace: dict[str, object] = {}
    exec(compile(script, str(RELOAD_SCRIPT), "exec"), namespace)  # defines only; main() runs under __main__
    names = ["classify", "embed", "fusion", "minilm_encoder", "minilm_tokenizer", "rank", "search", "fusion"]
    assert namespace["load_order"](names) == contract.load_order(names)
    assert contract.load_order(names) == ["fusion", "minilm_encoder", "minilm_tokenizer", "embed"]


def test_publish_switches_in_the_contracts_order(tmp_path):
    for model in ["search", "embed", "rank", "fusion", "classify", "e5_tokenizer", "e5_encoder"]:
        (tmp_path / model).mkdir()
        (tmp_path / model / "config.pbtxt").write_text("")
    assert versioned_models(tmp_path) == ["e5_encoder", "e5_tokenizer", "fusion", "embed"]


def test_a_release_needs_the_same_unversioned_heads_not_all_of_them(tmp_path):
    """A spec without `search:` builds neither `search` nor `similar`: releases compare only the heads built;
    a head that one side has and the other lacks is refused by name, not with a missing file."""

    def repository(name: str, models: list[str]) -> Path:
        for model in models:
            (tmp_path / name / model).mkdir(parents=True)
            (tmp_path / name / model / "config.pbtxt").write_text(f'name: "{model}"\n')
        return tmp_path / name

    heads = ["embed", "embedder", "rank", "classify"]
    check_compatible(repository("live", heads), repository("candidate", heads))
    with pytest.raises(RepositoryError, match="the new spec adds the model 'similar'"):
        check_compatible(tmp_path / "live", repository("with_similar", [*heads, "similar"]))


def test_the_check_command_fails_on_a_stale_block(tmp_path):
    stale = tmp_path / "reload_models.py"
    stale.write_text(RELOAD_SCRIPT.read_text().replace('"search"', '"seach"'))
    command = [sys.executable, "-m", "ecomserve.contract", "--check", str(stale)]
    assert subprocess.run(command, capture_output=True).returncode == 1
    assert subprocess.run([sys.executable, "-m", "ecomserve.contract", "--write", str(stale)]).returncode == 0
    assert stale.read_text() == RELOAD_SCRIPT.read_text()
    assert subprocess.run(command).returncode == 0


def test_a_script_without_markers_is_refused():
    with pytest.raises(ValueError, match="no generated block"):
        contract.with_script_block("print('no markers')\n")


def test_names():
    assert contract.tokenizer_model("e5") == "e5_tokenizer" and contract.encoder_model("e5") == "e5_encoder"
    assert RESERVED_NAMES == {"embed", "rank", "classify", "fusion", "vote"}
    assert contract.ADMIN_KEY_ENV == "ECOMSERVE_ADMIN_KEY"
