"""What keeps the pods closed: non-root without privileges, no secret values rendered, no key in any
container's environment (only the paths of mounted key files), Triton behind ecomserve's front process (a
command the supervisor accepts, no key or public Triton port on tritonserver's command line), model control
behind the admin key, and the NetworkPolicy's ingress.

Checked without a cluster, like every tests/test_k8s_*.py (helpers: tests/k8s_tools.py)."""

from __future__ import annotations

import base64
import os
import re
from pathlib import PurePosixPath

import pytest
import yaml
from k8s_tools import (
    ALL_RENDERS,
    CHART,
    CI_VALUES,
    NAMESPACE,
    RELEASE,
    TRITONSERVER,
    chart,
    checked,
    containers,
    documents,
    flag,
    helm_template_command,
    objects,
    one,
    pod_templates,
    render,
    run,
    secret_file,
    selects,
    supervisor_flag,
    supervisor_options,
    tools,
    triton,
)

from ecomserve.server import supervise


def tritonserver_command(container: dict) -> list[str]:
    """What the supervisor runs: the command after `--`, then the container's args."""
    command = container["command"]
    return command[command.index("--") + 1 :] + container.get("args", [])


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_pods_run_as_non_root_without_privileges(source):
    for owner, _, spec in pod_templates(render(source)):
        pod_context = spec["securityContext"]
        assert pod_context["runAsNonRoot"] is True, owner
        # A high uid and gid (the image's USER 10001:10001) that no node user has.
        assert pod_context["runAsUser"] >= 10000 and pod_context["runAsGroup"] >= 10000, owner
        assert pod_context["fsGroup"] >= 10000, owner
        assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}, owner
        assert spec.get("automountServiceAccountToken") is False, f"{owner} needs no API token"
        for container in containers(spec):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, f"{owner}/{container['name']}"
            assert context["capabilities"]["drop"] == ["ALL"], f"{owner}/{container['name']}"
            assert context.get("readOnlyRootFilesystem") is True, f"{owner}/{container['name']}"
            assert context["runAsNonRoot"] is True and context["runAsUser"] >= 10000, f"{owner}/{container['name']}"
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, f"{owner}/{container['name']}"
            resources = container["resources"]
            assert resources["requests"] and resources["limits"], f"{owner}/{container['name']}: requests and limits"


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_objects_carry_their_namespace(source):
    for obj in render(source):
        assert obj["metadata"].get("namespace"), f"{obj['kind']}/{obj['metadata']['name']} has no namespace"


DIGEST = "sha256:" + "0123456789abcdef" * 4


def test_every_image_takes_a_digest():
    sets = [f"{key}.digest={DIGEST}" for key in ("image", "rollout.reload.image", "tensorrt.image", "tests.image")]
    rendered = chart("tensorrt", sets=(*sets, "rollout.strategy=reload"))
    images = [c["image"] for _, _, spec in pod_templates(rendered) for c in containers(spec)]
    assert len(images) == 4 and all(image.endswith(f"@{DIGEST}") for image in images), images


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_no_secret_values_are_rendered(source):
    rendered = render(source)
    secrets = [secret["metadata"]["name"] for secret in objects(rendered, "Secret")]
    # Credentials come from existing Secrets, referenced by name; the exceptions are the keys the chart
    # generates (random, never in values): the admin key (test_model_control_needs_the_admin_key) and, with
    # apiKey.create, the inference key (tests/test_k8s_api_key.py).
    generated = [f"{RELEASE}-admin-key"] if source.startswith("chart:") else []
    if source == "chart:api-key":
        generated.append(f"{RELEASE}-api-key")
    assert sorted(secrets) == sorted(generated), secrets
    sensitive = re.compile(r"KEY|SECRET|TOKEN|PASSWORD")
    for owner, _, spec in pod_templates(rendered):
        for container in containers(spec):
            for env in container.get("env", []):
                # A *_FILE variable names a mounted Secret file (test_no_container_has_a_key_in_its_environment).
                if sensitive.search(env["name"]) and not env["name"].endswith("_FILE"):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], f"{owner}: {env['name']}"
    text = yaml.safe_dump_all(rendered)
    assert not re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN|private_key", text)


# tritonserver flags that would give Triton a public listener (the front owns the pod's ports).
PUBLIC_TRITON_FLAG = re.compile(r"--(?:(?:http|grpc|metrics)-(?:port|address)|allow-(?:sagemaker|vertex-ai))(?:=|$)")


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_triton_runs_behind_the_front(source):
    rendered = render(source)
    container = triton(rendered)
    options = supervisor_options(container)
    command = container["command"]
    assert command[command.index("--") + 1 :] == [TRITONSERVER], "the supervisor runs the NGC tritonserver"
    # The front reads its limits from the repository Triton serves; logs and sockets go to the /tmp emptyDir.
    assert supervisor_flag(container, "repository") == flag(container, "model-repository")
    assert PurePosixPath(supervisor_flag(container, "work-dir")).is_relative_to("/tmp")
    # No key and no public Triton listener on any command line of the Triton pods (/proc shows them to
    # every local user); the key reaches the front as a mounted Secret file.
    for owner, _, spec in pod_templates(rendered):
        if owner.startswith("Deployment/"):
            for each in containers(spec):
                for arg in each.get("command", []) + each.get("args", []):
                    assert "restricted" not in arg and "ECOMSERVE_ADMIN_KEY" not in arg, f"{owner}: {arg}"
    triton_command = tritonserver_command(container)
    assert not [arg for arg in triton_command if PUBLIC_TRITON_FLAG.match(arg)], triton_command
    assert triton_admin_key_ref(rendered) is not None, "the front checks the admin key, read from a mounted file"
    # The supervisor accepts the command as rendered (it exits 2 otherwise) ...
    stub_watchdog = "--no-stub-watchdog" not in options
    assert stub_watchdog, "explicit model control: the stub watchdog runs"
    assert supervise.check_command(triton_command, stub_watchdog) is None
    # ... and would refuse the restricted-API flags this chart used to give Triton.
    old_flag = "--http-restricted-api=model-repository:ecomserve-admin-key=$(ECOMSERVE_ADMIN_KEY)"
    assert supervise.check_command([*triton_command, old_flag], stub_watchdog) is not None


def test_supervisor_flags_are_refused_in_extra_args():
    for name in supervise._OWNED_FLAGS:
        result = run(helm_template_command(sets=(f"triton.extraArgs={{{name}=key-9f1c}}",)))
        assert result.returncode != 0, f"{name} in triton.extraArgs rendered"
        assert f"triton.extraArgs: remove {name}:" in result.stderr, result.stderr
        assert "key-9f1c" not in result.stderr, "the refusal must not print the value (it may be a key)"
    allowed = triton(chart("default", sets=("triton.extraArgs={--model-load-thread-count=4}",)))
    assert allowed["args"][-1] == "--model-load-thread-count=4"


def test_metrics_port_serves_triton_and_the_front():
    rendered = chart("default")
    endpoints = one(rendered, "ServiceMonitor")["spec"]["endpoints"]
    assert [(endpoint["port"], endpoint["path"]) for endpoint in endpoints] == [("metrics", "/metrics")]
    test_script = one(rendered, "Pod")["spec"]["containers"][0]["command"][-1]
    for family in ("nv_inference_request_success", "ecomserve_front_admitted_total"):
        assert f'echo "$metrics" | grep -q {family}' in test_script, f"helm test must find {family}"


def triton_admin_key_ref(rendered: list[dict]) -> dict | None:
    """The Secret key the supervisor's --admin-key-file reads, through the pod's volume, or None without the
    flag; the key is never in the Triton container's environment."""
    spec = one(rendered, "Deployment")["spec"]["template"]["spec"]
    container = triton(rendered)
    assert "ECOMSERVE_ADMIN_KEY" not in {item["name"] for item in container.get("env", [])}
    path = supervisor_flag(container, "admin-key-file")
    if path is None:
        return None
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])["secret"]
    (item,) = [i for i in volume["items"] if f"{mount['mountPath']}/{i['path']}" == path]
    return {"name": volume["secretName"], "key": item["key"]}


ADMIN_KEY_FILE = "/var/run/secrets/ecomserve/admin-key/admin-key"


def job_admin_key_ref(spec: dict, container: dict) -> dict | None:
    """The Secret key behind the file that the reload Job's ECOMSERVE_ADMIN_KEY_FILE names (mounted read-only,
    mode 0440), or None without that variable; the key itself is never in the environment."""
    env = {item["name"]: item for item in container.get("env", [])}
    assert "ECOMSERVE_ADMIN_KEY" not in env, "the admin key is a mounted file, never a variable"
    if "ECOMSERVE_ADMIN_KEY_FILE" not in env:
        return None
    assert env["ECOMSERVE_ADMIN_KEY_FILE"] == {"name": "ECOMSERVE_ADMIN_KEY_FILE", "value": ADMIN_KEY_FILE}
    item = secret_file(spec, container, ADMIN_KEY_FILE)
    assert item["mode"] == 0o440 and item["readOnly"] is True, item
    return {"name": item["name"], "key": item["key"]}


# Secrets that hold a key, under the chart's names; a Secret mounted as a pod's admin-key or api-key volume
# (an existing Secret) counts too.
KEY_VOLUMES = ("admin-key", "api-key")
# Renders with the reload Job beside those in ALL_RENDERS: (ci values name, --set assignments).
JOB_RENDERS = [
    ("reload", ()),
    ("api-key", ("rollout.strategy=reload",)),
    ("reload", ("triton.adminKey.existingSecret=shop-triton-admin", "apiKey.existingSecret=shop-inference")),
]


def assert_no_key_in_env(rendered: list[dict]) -> None:
    """No container of a Deployment, Job or Pod holds a key in its environment: no variable or envFrom reads a
    key Secret, no ECOMSERVE_ADMIN_KEY or ECOMSERVE_API_KEY; a *_KEY_FILE variable is a literal path to a
    Secret file mounted in that container."""
    key_secrets = {f"{RELEASE}-admin-key", f"{RELEASE}-api-key"}
    for _, _, spec in pod_templates(rendered):
        key_secrets |= {v["secret"]["secretName"] for v in spec.get("volumes", []) if v["name"] in KEY_VOLUMES}
    for owner, _, spec in pod_templates(rendered):
        for container in containers(spec):
            where = f"{owner}/{container['name']}"
            for env in container.get("env", []):
                assert env["name"] not in ("ECOMSERVE_ADMIN_KEY", "ECOMSERVE_API_KEY"), f"{where}: {env['name']}"
                reference = env.get("valueFrom", {}).get("secretKeyRef") or {}
                assert reference.get("name") not in key_secrets, f"{where}: {env['name']} reads a key Secret"
                if env["name"].endswith("_KEY_FILE"):
                    assert set(env) == {"name", "value"}, f"{where}: {env['name']} must be a literal path"
                    assert secret_file(spec, container, env["value"])["name"] in key_secrets, where
            for source in container.get("envFrom", []):
                assert source.get("secretRef", {}).get("name") not in key_secrets, f"{where}: envFrom a key Secret"


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_no_container_has_a_key_in_its_environment(source):
    assert_no_key_in_env(render(source))


@pytest.mark.parametrize(("name", "sets"), JOB_RENDERS)
def test_the_reload_job_gets_the_keys_as_file_paths(name, sets):
    rendered = chart(name, sets=sets)
    assert_no_key_in_env(rendered)
    job = one(rendered, "Job")["spec"]["template"]["spec"]
    env = {item["name"] for item in job["containers"][0]["env"]}
    assert "ECOMSERVE_ADMIN_KEY_FILE" in env
    assert ("ECOMSERVE_API_KEY_FILE" in env) == (name == "api-key" or "apiKey.existingSecret" in " ".join(sets))


def generated_admin_key(rendered: list[dict]) -> str:
    secret = one(rendered, "Secret", f"{RELEASE}-admin-key")
    assert secret["type"] == "Opaque" and set(secret["data"]) == {"admin-key"}
    return base64.b64decode(secret["data"]["admin-key"]).decode()


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_model_control_needs_the_admin_key(source):
    rendered = render(source)
    container = triton(rendered)
    assert flag(container, "model-control-mode") == "explicit" and "--load-model=*" in container["args"]
    # The front checks the key, read from a mounted file: never on a command line (test_triton_runs_behind_the_front).
    reference = {"name": f"{RELEASE}-admin-key", "key": "admin-key"}
    assert triton_admin_key_ref(rendered) == reference
    for owner, _, spec in pod_templates(rendered):
        if owner.startswith("Job/"):
            assert job_admin_key_ref(spec, spec["containers"][0]) == reference, f"{owner} must send the same key"
    if source.startswith("kustomize:"):
        assert not objects(rendered, "Secret"), "the overlays reference a Secret made beforehand (README)"
        return
    key = generated_admin_key(rendered)
    assert re.fullmatch(r"[A-Za-z0-9]{48}", key), "letters and digits: safe inside Triton's key=value flag"
    assert key not in yaml.safe_dump_all([obj for obj in rendered if obj["kind"] != "Secret"])
    if source == "chart:default":
        again = documents(checked(helm_template_command()))
        assert generated_admin_key(again) != key, "a random key per install (kept on upgrades by lookup)"


def test_stub_watchdog_needs_explicit_model_control():
    assert "--no-stub-watchdog" not in supervisor_options(triton(chart("default")))
    unwatched = ["triton.stubWatchdog.enabled=false", "triton.modelControl.mode=none", "triton.modelControl.mode=poll"]
    for assignment in unwatched:
        assignments = (assignment,)
        container = triton(chart("default", sets=assignments))
        assert "--no-stub-watchdog" in supervisor_options(container), f"{assignments}: the supervisor hosts the front"
        assert supervise.check_command(tritonserver_command(container), stub_watchdog=False) is None, assignments


def test_admin_key_from_an_existing_secret_and_none_without_explicit_control():
    sets = ("triton.adminKey.existingSecret=shop-triton-admin", "triton.adminKey.secretKey=token")
    rendered = chart("reload", sets=sets)
    assert not objects(rendered, "Secret"), "an existing Secret is referenced, not rendered"
    reference = {"name": "shop-triton-admin", "key": "token"}
    assert triton_admin_key_ref(rendered) == reference
    job = one(rendered, "Job")["spec"]["template"]["spec"]
    assert job_admin_key_ref(job, job["containers"][0]) == reference
    for mode in ("none", "poll"):
        plain = chart("default", sets=(f"triton.modelControl.mode={mode}",))
        assert not objects(plain, "Secret") and triton_admin_key_ref(plain) is None


def test_notes_name_the_admin_key_secret_but_never_print_it():
    command = [tools()["helm"], "install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client"]
    result = run([*command, "--values", CI_VALUES["reload"]], env={**os.environ, "KUBECONFIG": os.devnull})
    assert result.returncode == 0, result.stderr
    manifest, notes = result.stdout.split("\nNOTES:\n")
    encoded = re.search(r'^  admin-key: "?([A-Za-z0-9+/=]+)"?$', manifest, re.MULTILINE).group(1)
    assert len(base64.b64decode(encoded)) == 48
    assert f"Secret {RELEASE}-admin-key, key admin-key" in notes
    assert encoded not in notes and base64.b64decode(encoded).decode() not in notes
    assert "ecomserve publish" in notes and "rollout.revision" in notes


def test_network_policy_limits_inference_to_the_given_peers():
    ingress = one(chart("networkpolicy"), "NetworkPolicy")["spec"]["ingress"]
    inference = next(rule for rule in ingress if {"port": "grpc", "protocol": "TCP"} in rule["ports"])
    assert inference["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "search-frontend"}}}]
    assert {"port": "api", "protocol": "TCP"} in inference["ports"], "the HTTP API is inference too"
    helpers = ingress[-1]["from"][0]["podSelector"]["matchLabels"]
    test_pod = one(chart("default"), "Pod")
    assert selects(helpers, test_pod["metadata"]["labels"]), "helm test must still reach the pods"


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_network_policy_admits_the_api_port_like_http(source):
    """The HTTP API's port is reachable from exactly the peers the KServe HTTP port is (inferenceFrom, and this
    release's helm test and reload pods), on the container's port name."""
    rendered = render(source)
    container_ports = {port["name"] for port in triton(rendered)["ports"]}
    for policy in objects(rendered, "NetworkPolicy"):
        ingress = policy["spec"]["ingress"]
        for rule in ingress:
            names = {port["port"] for port in rule["ports"]}
            assert names <= container_ports, f"{source}: {names - container_ports} is no container port"
            assert ("http" in names) == ("api" in names), f"{source}: api and http must share their rules: {rule}"
        assert any("api" in {port["port"] for port in rule["ports"]} for rule in ingress)
