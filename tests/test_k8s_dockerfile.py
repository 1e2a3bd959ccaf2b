"""The Dockerfile: hadolint, the pinned NGC Triton base, the supervisor as entrypoint, a non-root user.

Checked without a cluster, like every tests/test_k8s_*.py (helpers: tests/k8s_tools.py)."""

from __future__ import annotations

import json
import re

import yaml
from k8s_tools import (
    K8S,
    REPO_ROOT,
    SUPERVISOR,
    TRITONSERVER,
    hadolint,
    run,
)

from ecomserve.server import supervise


def test_dockerfile_passes_hadolint():
    result = run([hadolint(), "--config", K8S / ".hadolint.yaml", K8S / "Dockerfile"], cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_on_ngc_triton_and_runs_as_non_root():
    text = (K8S / "Dockerfile").read_text()
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()]
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    # The base is a build argument (an operator may pick another NGC release); its default is pinned.
    build_args = dict(line.split()[1].split("=", 1) for line in lines if line.startswith("ARG ") and "=" in line)
    assert bases[0] == "${TRITON_IMAGE}" and build_args["TRITON_IMAGE"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    # `docker run` serves through the front too: the supervisor, then tritonserver after `--`.
    entrypoint = json.loads(next(line for line in lines if line.startswith("ENTRYPOINT "))[len("ENTRYPOINT ") :])
    cmd = json.loads(next(line for line in lines if line.startswith("CMD "))[len("CMD ") :])
    assert entrypoint[: len(SUPERVISOR)] == SUPERVISOR and cmd[:2] == ["--", TRITONSERVER]
    assert supervise.check_command(cmd[1:]) is None
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and re.fullmatch(r"[1-9]\d*:\d+", users[-1]), "the last USER must be a numeric non-root uid"
    assert any(line.startswith("HEALTHCHECK ") and "/v2/health/ready" in " ".join(lines) for line in lines)
    # Every port the front listens on by default (the chart's triton.ports: KServe HTTP, gRPC, metrics and the
    # HTTP API) is exposed.
    exposed = {int(port) for line in lines if line.startswith("EXPOSE ") for port in line.split()[1:]}
    chart_ports = yaml.safe_load((K8S / "chart" / "ecomserve" / "values.yaml").read_text())["triton"]["ports"]
    assert exposed == set(chart_ports.values()) and 8080 in exposed, exposed
    assert any("pip install --no-cache-dir ." in line for line in lines), "dependencies come from pyproject.toml"
    ignored = (K8S / "Dockerfile.dockerignore").read_text()
    assert "!pyproject.toml" in ignored and "!src/" in ignored
