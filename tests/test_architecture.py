"""The import structure: the contracts in pyproject.toml's [tool.importlinter] (layers from the CLI down to the
leaf modules, no cycles inside any package, what the search and similar models may load), and their process
checked for real."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Too heavy for a stub that only answers searches and similar items; tritonclient is the client side anyway.
NOT_IN_THE_SEARCH_MODEL = ("rich", "tritonclient", "ecomserve.repository.builder")


def test_import_contracts_are_kept():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint_imports, "lint-imports is missing: pip install -e '.[test]'"
    result = subprocess.run(
        [lint_imports, "--no-cache", "pyproject.toml"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_search_and_similar_models_import_no_builder_rich_or_tritonclient():
    # The module imports triton_python_backend_utils, which the python backend shipped with the wheel provides.
    pytriton = importlib.util.find_spec("pytriton")
    assert pytriton is not None and pytriton.submodule_search_locations
    backend = Path(pytriton.submodule_search_locations[0]) / "tritonserver" / "backends" / "python"
    assert (backend / "triton_python_backend_utils.py").is_file(), backend
    code = (
        "import json, sys; import ecomserve.serving_models.search, ecomserve.serving_models.similar; "
        f"print(json.dumps(sorted(m for m in {NOT_IN_THE_SEARCH_MODEL!r} if m in sys.modules)))"
    )
    path = os.pathsep.join(filter(None, [str(backend), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": path},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []
