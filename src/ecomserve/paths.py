"""Data the package ships (src/ecomserve/data/) and where the pipeline specs are found.

The eval set, the corpus and the parity texts are package data read with importlib.resources, so an
installed ecomserve (wheel, Docker image) finds them from any working folder. The shipped specs live in
the project's `export/` folder, the place users edit; the package carries identical copies in
data/specs/ (tests/test_install.py checks they match), which a working folder without export/ uses."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

# The user-facing spec folder, relative to the working folder (a checkout of the project).
EXPORT_DIR = Path("export")
DEFAULT_SPEC_NAME = "default.yaml"


def data_file(*parts: str) -> Traversable:
    """A file shipped in ecomserve/data/."""
    return resources.files("ecomserve").joinpath("data", *parts)


def read_data_text(*parts: str) -> str:
    return data_file(*parts).read_text(encoding="utf-8")


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def corpus_lines(name: str) -> list[str]:
    """The non-empty lines of a shipped corpus file (titles.txt, queries.txt), stripped."""
    return _lines(read_data_text("corpus", name))


def corpus_texts() -> list[str]:
    """Shipped product titles and queries: calibration data for INT8, training data for distillation."""
    return corpus_lines("titles.txt") + corpus_lines("queries.txt")


def parity_texts() -> list[str]:
    """Fixed texts every exported stage is compared to PyTorch on: the non-empty lines, as written."""
    return [line for line in read_data_text("parity_texts.txt").splitlines() if line.strip()]


def eval_set_text() -> str:
    """The shipped relevance set (JSON): products, categories and graded queries."""
    return read_data_text("eval", "relevance.json")


def typed_eval_set_text() -> str:
    """The shipped typed eval set (JSON, issue 17): near-duplicate products, lexical and filtered queries."""
    return read_data_text("eval", "typed.json")


def packaged_spec(name: str = DEFAULT_SPEC_NAME) -> Path:
    """The package's copy of a shipped spec (default.yaml, ensemble.yaml), as a file on disk."""
    spec = data_file("specs", name)
    if not isinstance(spec, Path):  # a zip import: load_spec and spec_dir need a real folder
        raise FileNotFoundError(f"ecomserve is not installed as files: no path for its spec {name}")
    return spec


def default_spec(name: str = DEFAULT_SPEC_NAME) -> Path:
    """./export/NAME when the working folder has one (a project checkout), else the packaged copy."""
    local = EXPORT_DIR / name
    return local if local.is_file() else packaged_spec(name)
