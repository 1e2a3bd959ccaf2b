"""A non-editable install (the wheel built from this checkout), used from an empty folder, finds its data
and default spec in the package, builds the default pipeline and serves it, and says what to install
when the `export` extra is missing.

No dependency is downloaded: each test environment is a `python -m venv --without-pip` with the wheel
installed into it (`pip --python`, --no-deps), plus one .pth line naming a folder of symlinks to this
venv's site-packages entries. That folder leaves out ecomserve's editable install (its
__editable__*.pth, which a .pth-listed folder would not run anyway) and, for the no-extras
environment, the import packages of the `export` extra: torch, transformers, onnx, openvino, nncf."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from ecomserve.errors import EXPORT_MODULES
from ecomserve.evaluation import load_eval_set
from ecomserve.paths import corpus_texts, packaged_spec, parity_texts
from ecomserve.server.process import free_port

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])
# The export extra's import packages that are not also runtime dependencies.
EXTRA_PACKAGES = (EXPORT_MODULES - {"ml_dtypes"}) | {"functorch", "torchgen", "openvino_telemetry"}
INSTALL_EXTRA = "pip install 'ecomserve[export]'"


def test_packaged_specs_are_the_export_specs():
    """The package's specs are copies of export/*.yaml, the ones users edit: both must change together."""
    for name in ("default.yaml", "ensemble.yaml", "teacher.yaml"):
        assert packaged_spec(name).read_bytes() == (ROOT / "export" / name).read_bytes(), (
            f"export/{name} and src/ecomserve/data/specs/{name} differ: copy export/{name} over the other"
        )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout, built from a copy of it (the build writes build/ and egg-info)."""
    root = tmp_path_factory.mktemp("wheel")
    tree = root / "tree"
    shutil.copytree(
        SRC, tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc", "*.onnx", "*.plan")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root, tree])
    (built,) = root.glob("ecomserve-*.whl")
    return built


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done


class Installed:
    """A venv with the wheel installed and this venv's dependencies (less `leave_out`) visible."""

    def __init__(self, root: Path, wheel: Path, leave_out: frozenset[str] = frozenset()):
        self.root = root
        self.venv = root / "venv"
        _run([sys.executable, "-m", "venv", "--without-pip", self.venv])
        deps = root / "deps"
        deps.mkdir()
        for entry in SITE_PACKAGES.iterdir():
            top = entry.name.split("-")[0].removesuffix(".py")
            if entry.suffix != ".pth" and top not in leave_out | {"ecomserve", "__editable__", "__pycache__"}:
                (deps / entry.name).symlink_to(entry)
        site = Path(
            _run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
        )
        (site / "_ecomserve_test_deps.pth").write_text(f"{deps}\n")
        _run([sys.executable, "-m", "pip", "--python", self.python, "install", "--no-deps", "--no-index", "-q", wheel])
        self.empty = root / "empty"
        self.empty.mkdir()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))},
            # The venv is used as a service would, not activated; the stub still finds its python3.
            "PATH": os.pathsep.join([str(self.venv / "bin"), "/usr/bin", "/bin"]),
            "COLUMNS": "200",
        }

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def ecomserve(self, *args, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        command = [self.venv / "bin" / "ecomserve", *args]
        if check:
            return _run(command, cwd=self.empty, env=self.env, **kwargs)
        return subprocess.run([str(p) for p in command], cwd=self.empty, env=self.env, capture_output=True, text=True)

    def python_json(self, code: str):
        return json.loads(_run([self.python, "-c", code], cwd=self.empty, env=self.env).stdout)


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Installed:
    return Installed(tmp_path_factory.mktemp("installed"), wheel)


@pytest.fixture(scope="module")
def without_export(wheel, tmp_path_factory) -> Installed:
    return Installed(tmp_path_factory.mktemp("no-export"), wheel, leave_out=EXTRA_PACKAGES)


NO_TORCH = "import importlib.util, json; print(json.dumps(importlib.util.find_spec('torch') is None))"
PROBE = """
import json, sys
import ecomserve, ecomserve.paths as paths
from ecomserve.evaluation import load_eval_set
print(json.dumps({
    "module": ecomserve.__file__,
    "sys_path": sys.path,
    "corpus": paths.corpus_texts(),
    "parity": paths.parity_texts(),
    "eval_queries": [q.text for q in load_eval_set().queries],
    "default_spec": str(paths.default_spec()),
}))
"""


@pytest.mark.integration
def test_installed_package_reads_its_data_from_any_folder(installed):
    found = installed.python_json(PROBE)
    assert Path(found["module"]).is_relative_to(installed.venv), found["module"]
    assert not any(Path(p).is_relative_to(SRC) for p in found["sys_path"] if p), "the editable install leaks in"
    assert found["corpus"] == corpus_texts() and len(found["corpus"]) > 1000
    assert found["parity"] == parity_texts()
    assert found["eval_queries"] == [q.text for q in load_eval_set().queries]
    # No ./export/default.yaml in the working folder: the packaged copy.
    assert Path(found["default_spec"]).is_relative_to(installed.venv)
    assert Path(found["default_spec"]).read_bytes() == (ROOT / "export/default.yaml").read_bytes()


@pytest.mark.integration
def test_installed_package_builds_and_serves_the_default_pipeline(installed):
    """`ecomserve build` with no --spec from an empty folder (the packaged default), then `serve` on it:
    the python backend's stub imports the installed ecomserve, and answers `query embed`."""
    repository = installed.root / "model_repository"
    installed.ecomserve("build", "--repository", repository, timeout=600)
    info = json.loads((repository / "ecomserve_build.json").read_text())
    assert [e["source"] for e in info["spec"]["encoders"]] == ["bundled:all-MiniLM-L6-v2"]
    for command in ("serve", "publish", "bench"):
        assert "packaged copy" in installed.ecomserve(command, "--help").stdout

    ports = [free_port() for _ in range(4)]
    serve = [installed.venv / "bin" / "ecomserve", "serve", "--repository", repository]
    for flag, port in zip(("--http-port", "--grpc-port", "--metrics-port", "--api-port"), ports, strict=True):
        serve += [flag, port]
    process = subprocess.Popen(
        [str(p) for p in serve], cwd=installed.empty, env=installed.env, stderr=subprocess.PIPE, text=True
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
            lines.append(process.stderr.readline())
            assert process.poll() is None, "".join(lines)
        query = installed.ecomserve("query", "embed", "red shoes", "--url", f"127.0.0.1:{ports[0]}", timeout=60)
        assert len(json.loads(query.stdout)["embeddings"][0]) == 384
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.integration
@pytest.mark.parametrize("command", ["build", "serve"])
def test_without_the_export_extra_building_says_what_to_install(without_export, command):
    """An install without torch, transformers, onnx, openvino (really absent from the environment, not
    blocked in-process): building exits 1 with one line naming the extra, not an import traceback."""
    assert without_export.python_json(NO_TORCH), "torch is importable in the no-extras environment"
    done = without_export.ecomserve(command, "--repository", without_export.root / command, check=False)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    # `serve` says first that it is building; the error is one line either way.
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and INSTALL_EXTRA in last and "--repository" in last, done.stderr
    assert "torch" in last, last
