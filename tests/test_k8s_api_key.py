"""The inference API key (chart values apiKey, kustomize component components/api-key): off by default (no
flag, no Secret, no volume); with it, a Secret mounted read-only as a file that the supervisor's --api-key-file
names, never an environment variable or a literal on a command line; `helm test` and the reload Job read the
same file and send it; the probes call health endpoints and need no key; the release notes name the Secret and
never print the key.

Checked without a cluster, like every tests/test_k8s_*.py (helpers: tests/k8s_tools.py)."""

from __future__ import annotations

import base64
import os
import re

import kubernetes_validate
import pytest
import yaml
from k8s_tools import (
    ALL_RENDERS,
    CHART,
    CI_VALUES,
    NAMESPACE,
    RELEASE,
    chart,
    checked,
    containers,
    documents,
    helm_template_command,
    objects,
    one,
    pod_templates,
    render,
    run,
    secret_file,
    supervisor_flag,
    tools,
    triton,
)

API_KEY_FILE = "/var/run/secrets/ecomserve/api-key/api-key"
# Renders with an inference key: the chart's ci/api-key-values.yaml (a generated Secret) and the GPU overlay
# with the api-key component (a Secret made beforehand).
WITH_KEY = {"chart:api-key", "kustomize:gpu+api-key"}
# The endpoints that stay open with a key; the probes may call only these.
HEALTH_PATHS = {"/v2/health/ready", "/v2/health/live", "/health"}
CREATED = {"name": f"{RELEASE}-api-key", "key": "api-key", "mode": 0o440, "readOnly": True}


def api_key_ref(rendered: list[dict]) -> dict | None:
    """The Secret item that the supervisor's --api-key-file reads (through the pod's volumes), or None."""
    spec = one(rendered, "Deployment")["spec"]["template"]["spec"]
    container = triton(rendered)
    path = supervisor_flag(container, "api-key-file")
    return None if path is None else secret_file(spec, container, path)


def assert_key_in_no_env_or_literal(rendered: list[dict], secret: str, key: str | None = None) -> None:
    """No container reads the key Secret into its environment, no container has ECOMSERVE_API_KEY (the
    supervisor's fallback variable) or a literal Bearer token on its command line, and the key (when known)
    appears in no object but its Secret."""
    for owner, _, spec in pod_templates(rendered):
        for container in containers(spec):
            where = f"{owner}/{container['name']}"
            for env in container.get("env", []):
                assert env["name"] != "ECOMSERVE_API_KEY", f"{where}: the key must be a file, not a variable"
                reference = env.get("valueFrom", {}).get("secretKeyRef", {})
                assert reference.get("name") != secret, f"{where}: {env['name']} reads the key Secret"
            for source in container.get("envFrom", []):
                assert source.get("secretRef", {}).get("name") != secret, f"{where}: envFrom the key Secret"
            for arg in container.get("command", []) + container.get("args", []):
                assert "$(ECOMSERVE_API_KEY" not in arg, f"{where}: {arg}"
                assert not re.search(r"Bearer [A-Za-z0-9]", arg), f"{where}: a literal Bearer token"
    if key is not None:
        assert key not in yaml.safe_dump_all([obj for obj in rendered if obj["kind"] != "Secret"])


def generated_api_key(rendered: list[dict]) -> str:
    secret = one(rendered, "Secret", f"{RELEASE}-api-key")
    assert secret["type"] == "Opaque" and set(secret["data"]) == {"api-key"}
    return base64.b64decode(secret["data"]["api-key"]).decode()


def assert_probes_need_no_key(rendered: list[dict]) -> None:
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        http_get = triton(rendered)[probe]["httpGet"]
        assert http_get["path"] in HEALTH_PATHS, f"{probe} calls {http_get['path']}, which needs the key"
        assert "httpHeaders" not in http_get, f"{probe} must not carry a key"


@pytest.mark.parametrize("source", [source for source in ALL_RENDERS if source not in WITH_KEY])
def test_no_api_key_by_default(source):
    rendered = render(source)
    assert api_key_ref(rendered) is None, "no --api-key-file without apiKey"
    assert not [s for s in objects(rendered, "Secret") if s["metadata"]["name"].endswith("-api-key")]
    for owner, _, spec in pod_templates(rendered):
        assert "api-key" not in {volume["name"] for volume in spec.get("volumes", [])}, owner
        for container in containers(spec):
            assert "ECOMSERVE_API_KEY_FILE" not in {env["name"] for env in container.get("env", [])}, owner
            assert "Authorization" not in " ".join(container.get("command", [])), owner
    assert_key_in_no_env_or_literal(rendered, f"{RELEASE}-api-key")


@pytest.mark.parametrize("source", sorted(WITH_KEY))
def test_api_key_is_a_mounted_secret_file(source):
    rendered = render(source)
    assert supervisor_flag(triton(rendered), "api-key-file") == API_KEY_FILE
    assert api_key_ref(rendered) == CREATED, "read-only, mode 0440, from <release>-api-key, key api-key"
    assert_probes_need_no_key(rendered)
    if source.startswith("kustomize:"):
        assert not objects(rendered, "Secret"), "the overlays reference a Secret made beforehand (README)"
        assert_key_in_no_env_or_literal(rendered, CREATED["name"])
        return
    key = generated_api_key(rendered)
    assert re.fullmatch(r"[A-Za-z0-9]{48}", key), "letters and digits: a safe header value"
    assert_key_in_no_env_or_literal(rendered, CREATED["name"], key)
    again = documents(checked(helm_template_command(CI_VALUES["api-key"])))
    assert generated_api_key(again) != key, "a random key per install (kept on upgrades by lookup)"


def test_api_key_from_an_existing_secret():
    rendered = chart("default", sets=("apiKey.existingSecret=shop-inference", "apiKey.secretKey=token"))
    assert [secret["metadata"]["name"] for secret in objects(rendered, "Secret")] == [f"{RELEASE}-admin-key"]
    assert api_key_ref(rendered) == {**CREATED, "name": "shop-inference", "key": "token"}
    assert_key_in_no_env_or_literal(rendered, "shop-inference")
    assert_probes_need_no_key(rendered)


def test_helm_test_and_reload_job_send_the_key_from_the_same_file():
    rendered = chart("api-key", sets=("rollout.strategy=reload",))
    for obj in rendered:  # this combination is in no ci/ file: validated here (less the ServiceMonitor)
        if obj["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(obj, "1.35", strict=True)
    reference = api_key_ref(rendered)
    test_pod = one(rendered, "Pod")
    wget = test_pod["spec"]["containers"][0]
    assert secret_file(test_pod["spec"], wget, API_KEY_FILE) == reference
    script = wget["command"][-1]
    assert f'auth="Authorization: Bearer $(cat {API_KEY_FILE})"' in script
    calls = [line.strip() for line in script.splitlines() if line.strip().startswith("wget ")]
    for call in calls:
        needs_key = "/v2/models/" in call or "/v1/models" in call
        assert ('--header "$auth"' in call) == needs_key, f"helm test: {call}"
    assert 'if wget -q -O /dev/null "$api/v1/models"' in script, "helm test checks the key is required"
    assert 'wget -q -O /dev/null "$api/health"' in script, "/health on the api port needs no key"
    job = one(rendered, "Job")["spec"]["template"]["spec"]
    reload = job["containers"][0]
    env = {item["name"]: item for item in reload["env"]}
    assert env["ECOMSERVE_API_KEY_FILE"] == {"name": "ECOMSERVE_API_KEY_FILE", "value": API_KEY_FILE}
    assert secret_file(job, reload, API_KEY_FILE) == reference
    # Both keys are files the Job's environment names (the admin key: tests/test_k8s_security.py); no variable
    # of the Job reads a Secret.
    assert "ECOMSERVE_ADMIN_KEY_FILE" in env and not [name for name, item in env.items() if "valueFrom" in item]
    assert_key_in_no_env_or_literal(rendered, CREATED["name"], generated_api_key(rendered))
    plain = one(chart("default"), "Pod")
    assert "Authorization" not in plain["spec"]["containers"][0]["command"][-1] and "volumes" not in plain["spec"]


def test_notes_name_the_api_key_secret_but_never_print_it():
    command = [tools()["helm"], "install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client"]
    env = {**os.environ, "KUBECONFIG": os.devnull}
    result = run([*command, "--values", CI_VALUES["api-key"]], env=env)
    assert result.returncode == 0, result.stderr
    manifest, notes = result.stdout.split("\nNOTES:\n")
    encoded = re.search(r'^  api-key: "?([A-Za-z0-9+/=]+)"?$', manifest, re.MULTILINE).group(1)
    key = base64.b64decode(encoded).decode()
    assert len(key) == 48 and encoded not in notes and key not in notes
    assert f"Secret {RELEASE}-api-key, key api-key" in notes
    assert f"http://{RELEASE}.{NAMESPACE}.svc:8080" in notes and "8080:api" in notes
    plain = run(command, env=env)
    assert plain.returncode == 0, plain.stderr
    assert "No inference API key" in plain.stdout.split("\nNOTES:\n")[1]
