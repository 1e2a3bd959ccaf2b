"""checkov's Kubernetes policies on the rendered chart (the defaults and the GPU profile).

Every failed check must be in k8s/checkov-allowlist.yaml with its reason, and every check listed there must
still fail (a stale entry would hide a regression). checkov runs offline (`--skip-download`).

Checked without a cluster, like every tests/test_k8s_*.py (helpers: tests/k8s_tools.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from k8s_tools import CI_VALUES, K8S, checked, helm_template_command, run

ALLOWLIST = K8S / "checkov-allowlist.yaml"
RENDERS = {"default": (), "gpu": (CI_VALUES["gpu"],)}


def checkov() -> Path:
    binary = Path(sys.executable).parent / "checkov"
    if not os.access(binary, os.X_OK):
        pytest.fail("checkov is not installed: pip install -e '.[test]'")
    return binary


def allowlist() -> dict[str, str]:
    entries = yaml.safe_load(ALLOWLIST.read_text())
    assert all(isinstance(reason, str) and reason.strip() for reason in entries.values()), "every entry needs a reason"
    return entries


def failed_checks(rendered: Path, *options: str) -> set[tuple[str, str]]:
    """(check id, resource) of every failed check."""
    command = [checkov(), "-f", rendered, "--framework", "kubernetes", "--quiet", "--compact", "--skip-download"]
    result = run([*command, "--output", "json", *options], env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    assert result.returncode in (0, 1), f"checkov failed to run:\n{result.stderr[-2000:]}"
    report = json.loads(result.stdout) if result.stdout.strip() else {}
    if isinstance(report, list):
        assert len(report) == 1, report
        report = report[0]
    failed = report.get("results", {}).get("failed_checks", [])
    return {(check["check_id"], check["resource"]) for check in failed}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkov")
    paths = {}
    for name, values in RENDERS.items():
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(checked(helm_template_command(*values)))
    return paths


@pytest.mark.parametrize("name", RENDERS)
def test_chart_passes_checkov(rendered, name):
    failed = failed_checks(rendered[name], "--skip-check", ",".join(allowlist()))
    assert not failed, (
        f"checkov checks failed on the {name} render "
        f"(fix them, or list them with a reason in {ALLOWLIST.name}): {sorted(failed)}"
    )


def test_allowlist_has_no_stale_entries(rendered):
    allowed = allowlist()
    still_failing = set()
    for path in rendered.values():
        still_failing |= {check for check, _ in failed_checks(path, "--check", ",".join(allowed))}
    stale = sorted(set(allowed) - still_failing)
    assert not stale, f"these checks pass now: remove them from {ALLOWLIST.name}: {stale}"
