"""Kubernetes deployment, checked without a cluster: the Helm chart, the kustomize overlays, the Dockerfile.

Every chart render (the defaults and each ci/*-values.yaml) and both overlays are validated against
the real API schemas of several Kubernetes releases (kubernetes-validate, strict: unknown fields
fail), then checked for what serving needs: probes on the served port, /dev/shm, selectors that
match the pods, the HPA's metrics served by the adapter rules, pinned images, resources, no secret
values, non-root pods, graceful shutdown, Triton behind ecomserve's front process (a command the
supervisor accepts, no key or public Triton port on tritonserver's command line). The scripts the
chart ships (TensorRT engine build, model reload) run here against stand-ins for trtexec, nvidia-smi and
Triton's HTTP API.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

import kubernetes_validate
import numpy as np
import pytest
import yaml
from k8s_tools import REPO_ROOT, ToolMissing, hadolint, k8s_binaries

from ecomserve.front import policy as front_policy
from ecomserve.server import supervise

K8S = REPO_ROOT / "k8s"
CHART = K8S / "chart" / "ecomserve"
CI_VALUES = {path.name.removesuffix("-values.yaml"): path for path in sorted((CHART / "ci").glob("*-values.yaml"))}
CHART_RENDERS = ["default", *CI_VALUES]
OVERLAYS = ["cpu", "gpu"]
RELEASE = NAMESPACE = "ecomserve"
# The oldest release the chart supports (Chart.yaml kubeVersion), kubectl's, and the newest schemas.
KUBERNETES_VERSIONS = ["1.29", "1.33", "1.35"]
# APIs a cluster with Prometheus Operator and prometheus-adapter serves; renders assume them.
CLUSTER_APIS = ("monitoring.coreos.com/v1/ServiceMonitor", "custom.metrics.k8s.io/v1beta1")
# Custom resources have no schema in kubernetes-validate: checked structurally
# (test_service_monitor_only_where_the_api_exists).
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor")}
GPU_RESOURCE = "nvidia.com/gpu"
# Metric families Triton 2.51 exposes (read from the embedded server's /metrics; the GPU families,
# absent on a CPU machine, from its libtritonserver) plus ecomserve's own. Dashboards and adapter
# rules may use nothing else.
TRITON_METRICS = {
    *(
        f"nv_inference_{name}"
        for name in (
            "request_success", "request_failure", "count", "exec_count", "pending_request_count",
            "request_duration_us", "queue_duration_us", "compute_input_duration_us",
            "compute_infer_duration_us", "compute_output_duration_us", "request_summary_us",
            "queue_summary_us", "compute_input_summary_us", "compute_infer_summary_us",
            "compute_output_summary_us",
        )
    ),
    "nv_cache_num_hits_per_model", "nv_cache_num_misses_per_model", "nv_cache_hit_duration_per_model",
    "nv_cache_miss_duration_per_model", "nv_cpu_utilization", "nv_cpu_memory_total_bytes",
    "nv_cpu_memory_used_bytes", "nv_gpu_utilization", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes",
    "nv_gpu_power_usage", "nv_gpu_power_limit", "nv_energy_consumption", "ecomserve_truncated_texts_total",
}  # fmt: skip


# --- rendering -------------------------------------------------------------------------------------


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
def overlay(name: str) -> list[dict]:
    return documents(checked([tools()["kubectl"], "kustomize", K8S / "kustomize" / name]))


def render(source: str) -> list[dict]:
    """'chart:<ci name or default>' or 'kustomize:<overlay>'."""
    kind, name = source.split(":")
    return chart(name) if kind == "chart" else overlay(name)


TRITONSERVER = "/opt/tritonserver/bin/tritonserver"
SUPERVISOR = ["/opt/ecomserve/venv/bin/python3", "-m", "ecomserve.server.supervise"]
ALL_RENDERS = [f"chart:{name}" for name in CHART_RENDERS] + [f"kustomize:{name}" for name in OVERLAYS]


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


def tritonserver_command(container: dict) -> list[str]:
    """What the supervisor runs: the command after `--`, then the container's args."""
    command = container["command"]
    return command[command.index("--") + 1 :] + container.get("args", [])


def adapter_rules(rendered: list[dict]) -> list[dict]:
    config_map = one(rendered, "ConfigMap", f"{RELEASE}-adapter-rules")
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def adapter_values_rules() -> list[dict]:
    return yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- lint and API schemas ----------------------------------------------------------------------------


@pytest.mark.parametrize("values", ["default", *CI_VALUES])
def test_helm_lint_strict(values):
    command = [tools()["helm"], "lint", "--strict", CHART]
    if values != "default":
        command += ["--values", CI_VALUES[values]]
    output = checked(command)
    assert "0 chart(s) failed" in output


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("source", ALL_RENDERS)
def test_render_matches_the_kubernetes_api(source, version):
    rendered = render(source)
    assert rendered, f"{source} rendered nothing"
    for obj in rendered:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_RESOURCES:
            continue
        name = f"{source}: {obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} is not valid Kubernetes {version}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{name}: {exc.message}")


def test_every_ci_values_file_is_rendered():
    assert {"gpu", "cpu", "s3", "gcs"} <= set(CI_VALUES), "GPU, CPU and object-storage profiles must stay in ci/"
    values_text = (CHART / "values.yaml").read_text()
    assert values_text.startswith("# yaml-language-server: $schema=values.schema.json\n")


# --- the Triton pods ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_probes_and_services_use_the_container_ports(source):
    rendered = render(source)
    container = triton(rendered)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert set(ports) == {"http", "grpc", "metrics"}
    # The front listens on every port, on every address of the pod; Triton only on unix sockets.
    for name in ("http", "grpc", "metrics"):
        assert ports[name] == int(supervisor_flag(container, f"{name}-port")), name
    assert supervisor_flag(container, "host") == "0.0.0.0"
    ready, live = "/v2/health/ready", "/v2/health/live"
    for probe, path in {"startupProbe": ready, "readinessProbe": ready, "livenessProbe": live}.items():
        http_get = container[probe]["httpGet"]
        assert (http_get["path"], http_get["port"]) == (path, "http"), f"{probe} must call {path} on the http port"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "large models need >= 10 min to load"
    for service in objects(rendered, "Service"):
        service_ports = {port["name"]: port for port in service["spec"]["ports"]}
        assert set(service_ports) == {"http", "grpc", "metrics"}
        for name, port in service_ports.items():
            assert port["targetPort"] == name and port["port"] == ports[name]
        assert service_ports["grpc"]["appProtocol"] == "grpc"


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_shm_and_writable_scratch_are_mounted(source):
    rendered = render(source)
    spec = one(rendered, "Deployment")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in triton(rendered)["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"], "/dev/shm must be a memory-backed emptyDir with a limit"
    assert "emptyDir" in volumes[mounts["/tmp"]], "with a read-only root, /tmp must be a writable emptyDir"


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_selectors_match_the_triton_pods_only(source):
    rendered = render(source)
    deployment = one(rendered, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selects(selector, pod_labels)
    assert not any(key.startswith("helm.sh/") or key == "app.kubernetes.io/version" for key in selector)
    selectors = {f"Service/{svc['metadata']['name']}": svc["spec"]["selector"] for svc in objects(rendered, "Service")}
    selectors["PodDisruptionBudget"] = one(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    for policy in objects(rendered, "NetworkPolicy"):
        selectors["NetworkPolicy"] = policy["spec"]["podSelector"]["matchLabels"]
    for constraint in deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
        selectors[f"spread {constraint['topologyKey']}"] = constraint["labelSelector"]["matchLabels"]
    for owner, chosen in selectors.items():
        assert chosen == selector, f"{owner} selects {chosen}, the Deployment's pods are {selector}"
    for owner, metadata, _ in pod_templates(rendered):
        if not owner.startswith("Deployment/"):  # helm test and reload Job pods must not receive traffic
            assert not selects(selector, metadata["labels"]), f"{owner} would be selected by the Services"
    for hpa in objects(rendered, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert "replicas" not in deployment["spec"], "with an HPA the Deployment must not set replicas"


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_images_are_pinned(source):
    for owner, _, spec in pod_templates(render(source)):
        for container in containers(spec):
            image = container["image"]
            name, _, tag = image.split("@")[0].rpartition(":")
            assert name and tag and "/" not in tag, f"{owner}: {image} has no tag"
            assert tag != "latest", f"{owner}: {image} uses latest"


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_resources_are_set(source):
    rendered = render(source)
    for owner, _, spec in pod_templates(rendered):
        for container in containers(spec):
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{owner}/{container['name']} requests"
            assert "memory" in resources.get("limits", {}), f"{owner}/{container['name']} has no memory limit"
    gpu = "cpu" not in source
    spec = one(rendered, "Deployment")["spec"]["template"]["spec"]
    for container in containers(spec):
        resources = container["resources"]
        if gpu:
            assert resources["requests"][GPU_RESOURCE] == resources["limits"][GPU_RESOURCE] >= 1
        else:
            assert GPU_RESOURCE not in resources["requests"] and GPU_RESOURCE not in resources["limits"]
    assert (spec.get("nodeSelector", {}).get("nvidia.com/gpu.present") == "true") == gpu
    assert any(toleration.get("key") == GPU_RESOURCE for toleration in spec.get("tolerations", [])) == gpu
    assert flag(triton(rendered), "allow-gpu-metrics") == str(gpu).lower()


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_pods_run_as_non_root_without_privileges(source):
    for owner, _, spec in pod_templates(render(source)):
        pod_context = spec["securityContext"]
        assert pod_context["runAsNonRoot"] is True and pod_context["runAsUser"] > 0, owner
        assert spec.get("automountServiceAccountToken") is False, f"{owner} needs no API token"
        for container in containers(spec):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, f"{owner}/{container['name']}"
            assert context["capabilities"]["drop"] == ["ALL"], f"{owner}/{container['name']}"
            assert context.get("readOnlyRootFilesystem") is True, f"{owner}/{container['name']}"


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_no_secret_values_are_rendered(source):
    rendered = render(source)
    secrets = [secret["metadata"]["name"] for secret in objects(rendered, "Secret")]
    # Credentials come from existing Secrets, referenced by name; the one exception is the admin key the
    # chart generates (random, never in values; test_model_control_needs_the_admin_key).
    assert secrets == ([f"{RELEASE}-admin-key"] if source.startswith("chart:") else []), secrets
    sensitive = re.compile(r"KEY|SECRET|TOKEN|PASSWORD")
    for owner, _, spec in pod_templates(rendered):
        for container in containers(spec):
            for env in container.get("env", []):
                if sensitive.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], f"{owner}: {env['name']}"
    text = yaml.safe_dump_all(rendered)
    assert not re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN|private_key", text)


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_rollouts_and_shutdown_keep_capacity(source):
    rendered = render(source)
    deployment = one(rendered, "Deployment")
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0
    spec = deployment["spec"]["template"]["spec"]
    container = triton(rendered)
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    exit_timeout = int(flag(container, "exit-timeout-secs"))
    assert sleep > 0 and spec["terminationGracePeriodSeconds"] > sleep + exit_timeout
    assert container["command"][: len(SUPERVISOR)] == SUPERVISOR, "the supervisor passes SIGTERM on"
    assert {c["topologyKey"] for c in spec["topologySpreadConstraints"]} >= {"kubernetes.io/hostname"}
    pdb = one(rendered, "PodDisruptionBudget")["spec"]
    hpa = objects(rendered, "HorizontalPodAutoscaler")
    smallest = hpa[0]["spec"]["minReplicas"] if hpa else deployment["spec"]["replicas"]
    assert pdb.get("minAvailable", 0) < smallest, "a PDB at the replica count blocks every drain"


# --- Triton behind ecomserve's front process --------------------------------------------------------------

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
    # every local user); the key reaches the front through the environment, from a Secret.
    for owner, _, spec in pod_templates(rendered):
        if owner.startswith("Deployment/"):
            for each in containers(spec):
                for arg in each.get("command", []) + each.get("args", []):
                    assert "restricted" not in arg and "ECOMSERVE_ADMIN_KEY" not in arg, f"{owner}: {arg}"
    triton_command = tritonserver_command(container)
    assert not [arg for arg in triton_command if PUBLIC_TRITON_FLAG.match(arg)], triton_command
    assert admin_key_ref(container) is not None, "the front checks the admin key from ECOMSERVE_ADMIN_KEY"
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


# --- autoscaling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_hpa_metrics_are_served_by_the_adapter_rules(source):
    rendered = render(source)
    hpas = objects(rendered, "HorizontalPodAutoscaler")
    if source == "chart:fixed-replicas":
        assert not hpas
        return
    hpa = hpas[0]["spec"]
    rules = adapter_rules(rendered) if source.startswith("chart:") else adapter_values_rules()
    served = {rule["name"]["as"] for rule in rules}
    custom = [metric["pods"]["metric"]["name"] for metric in hpa["metrics"] if metric["type"] == "Pods"]
    assert custom and set(custom) <= served, f"HPA asks for {custom}, the adapter serves {served}"
    queue_rule = next(rule for rule in rules if rule["name"]["as"] == custom[0])
    assert "rate(nv_inference_queue_duration_us{" in queue_rule["metricsQuery"]
    assert "rate(nv_inference_request_success{" in queue_rule["metricsQuery"]
    assert set(queue_rule["resources"]["overrides"]) == {"namespace", "pod"}
    fallback = [metric for metric in hpa["metrics"] if metric is not hpa["metrics"][0]]
    assert len(fallback) == 1, "one utilisation fallback next to the queue-time metric"
    if "cpu" in source:
        assert fallback[0]["resource"]["name"] == "cpu"
    else:
        assert fallback[0]["pods"]["metric"]["name"] == "ecomserve_gpu_utilization"
    assert {"scaleUp", "scaleDown"} <= set(hpa["behavior"])


def test_adapter_values_file_matches_the_chart_rules():
    assert adapter_values_rules() == adapter_rules(chart("default"))


def test_dashboard_and_rules_use_only_triton_metrics():
    dashboard = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [rule["metricsQuery"] for rule in adapter_rules(chart("default"))]
    used = {name for query in queries for name in re.findall(r"\b((?:nv|ecomserve)_[a-z_]+)\s*\{", query)}
    assert used <= TRITON_METRICS, f"unknown metrics: {sorted(used - TRITON_METRICS)}"
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("throughput", "p50", "p99", "queue time", "batch size", "gpu utilisation", "cache hit"):
        assert topic in titles, f"the dashboard has no {topic} panel"
    config_map = one(chart("default"), "ConfigMap", f"{RELEASE}-dashboard")
    assert json.loads(config_map["data"]["ecomserve-triton.json"]) == dashboard
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_service_monitor_only_where_the_api_exists():
    rendered = chart("default")
    monitor = one(rendered, "ServiceMonitor")
    api_service = one(rendered, "Service", RELEASE)
    assert selects(monitor["spec"]["selector"]["matchLabels"], api_service["metadata"]["labels"])
    headless = one(rendered, "Service", f"{RELEASE}-headless")
    assert not selects(monitor["spec"]["selector"]["matchLabels"], headless["metadata"]["labels"]), "scraped twice"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    assert not objects(chart("default", apis=()), "ServiceMonitor")


# --- profiles and features ---------------------------------------------------------------------------------


def test_object_storage_repositories():
    s3 = chart("s3")
    container = triton(s3)
    assert flag(container, "model-repository") == "s3://ecomserve-models/model_repository"
    secrets = {env["name"]: env["valueFrom"]["secretKeyRef"]["name"] for env in container["env"] if "valueFrom" in env}
    aws_keys = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]
    admin = {"ECOMSERVE_ADMIN_KEY": f"{RELEASE}-admin-key"}
    assert secrets == {**dict.fromkeys(aws_keys, "ecomserve-s3-credentials"), **admin}
    assert not objects(s3, "PersistentVolumeClaim")
    volumes = one(s3, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert all("persistentVolumeClaim" not in volume for volume in volumes)
    gcs = chart("gcs")
    container = triton(gcs)
    assert flag(container, "model-repository") == "gs://ecomserve-models/model_repository"
    env = {item["name"]: item.get("value") for item in container["env"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == f"{mounts['gcs-credentials']}/credentials.json"
    volumes = {volume["name"]: volume for volume in one(gcs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["gcs-credentials"]["secret"]["secretName"] == "ecomserve-gcs-credentials"


def test_pvc_repository_is_read_only_and_kept():
    rendered = chart("default")
    claim = one(rendered, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    mount = next(m for m in triton(rendered)["volumeMounts"] if m["mountPath"] == "/models")
    assert mount["readOnly"] is True and flag(triton(rendered), "model-repository") == "/models"


def test_new_revision_rolls_pods_or_reloads_models():
    annotation = "ecomserve.dev/model-revision"
    template = one(chart("default", sets=("rollout.revision=2024-12-01",)), "Deployment")["spec"]["template"]
    assert template["metadata"]["annotations"][annotation] == "2024-12-01"
    reload = chart("reload")
    assert annotation not in one(reload, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert flag(triton(reload), "model-control-mode") == "explicit" and "--load-model=*" in triton(reload)["args"]
    job = one(reload, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-upgrade"
    env = {item["name"]: item.get("value") for item in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TRITON_SERVICE"] == f"{RELEASE}-headless.{NAMESPACE}.svc"
    assert env["RELOAD_MODELS"] == "", "default: the whole index, embed last (the script orders it)"
    scripts = one(reload, "ConfigMap", f"{RELEASE}-scripts")["data"]
    assert scripts["reload_models.py"] == (CHART / "files" / "reload_models.py").read_text().rstrip("\n")
    assert not objects(chart("default"), "Job")


def admin_key_ref(container: dict) -> dict | None:
    """The Secret key ECOMSERVE_ADMIN_KEY comes from, or None without that variable."""
    env = {item["name"]: item for item in container.get("env", [])}
    if "ECOMSERVE_ADMIN_KEY" not in env:
        return None
    assert "value" not in env["ECOMSERVE_ADMIN_KEY"], "the admin key comes from a Secret, never a literal"
    return env["ECOMSERVE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]


def generated_admin_key(rendered: list[dict]) -> str:
    secret = one(rendered, "Secret", f"{RELEASE}-admin-key")
    assert secret["type"] == "Opaque" and set(secret["data"]) == {"admin-key"}
    return base64.b64decode(secret["data"]["admin-key"]).decode()


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_model_control_needs_the_admin_key(source):
    rendered = render(source)
    container = triton(rendered)
    assert flag(container, "model-control-mode") == "explicit" and "--load-model=*" in container["args"]
    # The front checks the key, read from the environment: never on a command line (test_triton_runs_behind_the_front).
    reference = {"name": f"{RELEASE}-admin-key", "key": "admin-key"}
    assert admin_key_ref(container) == reference
    for owner, _, spec in pod_templates(rendered):
        if owner.startswith("Job/"):
            assert admin_key_ref(spec["containers"][0]) == reference, f"{owner} must send the same key"
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
    assert admin_key_ref(triton(rendered)) == reference
    assert admin_key_ref(one(rendered, "Job")["spec"]["template"]["spec"]["containers"][0]) == reference
    for mode in ("none", "poll"):
        plain = chart("default", sets=(f"triton.modelControl.mode={mode}",))
        assert not objects(plain, "Secret") and admin_key_ref(triton(plain)) is None


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


def test_tensorrt_engines_are_built_in_an_init_container(tmp_path):
    rendered = chart("tensorrt")
    spec = one(rendered, "Deployment")["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert init["image"] == "nvcr.io/nvidia/tensorrt:24.10-py3"
    assert init["resources"]["limits"][GPU_RESOURCE] == triton(rendered)["resources"]["limits"][GPU_RESOURCE]
    init_mounts = {mount["mountPath"]: mount for mount in init["volumeMounts"]}
    triton_mounts = {mount["mountPath"]: mount for mount in triton(rendered)["volumeMounts"]}
    for path in ("/models", "/models-source", "/engine-cache"):  # links made in the init container resolve in Triton
        assert init_mounts[path]["name"] == triton_mounts[path]["name"] and triton_mounts[path]["readOnly"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert "emptyDir" in volumes[triton_mounts["/models"]["name"]]
    scripts = one(rendered, "ConfigMap", f"{RELEASE}-scripts")["data"]
    assert scripts["build_engines.py"] == (CHART / "files" / "build_engines.py").read_text().rstrip("\n")
    assert json.loads(scripts["engines.json"]) == [], "the engines come from the repository's tensorrt_engines.json"
    check = {
        "shapes": "input_ids:2x8,attention_mask:2x8", "inputs": {"input_ids": "check_input_ids.bin"},
        "output": "embedding", "expected": "check_expected.bin", "dim": 384, "min_cosine": 0.999,
    }  # fmt: skip
    engine = {"model": "minilm_encoder", "version": "1", "onnx": "model.onnx", "trtexecArgs": ["--fp16"]}
    override = tmp_path / "override-values.yaml"
    override.write_text(yaml.safe_dump({"tensorrt": {"engines": [engine, {**engine, "version": "2", "check": check}]}}))
    overridden = documents(checked(helm_template_command(CI_VALUES["tensorrt"], override)))
    scripts = one(overridden, "ConfigMap", f"{RELEASE}-scripts")["data"]
    assert json.loads(scripts["engines.json"]) == [engine, {**engine, "version": "2", "check": check}]
    bad = {"tensorrt": {"engines": [{**engine, "check": {**check, "min_cosine": 2}}]}}
    override.write_text(yaml.safe_dump(bad))
    refused = run(helm_template_command(CI_VALUES["tensorrt"], override))
    assert refused.returncode != 0 and "min_cosine" in refused.stderr, refused.stderr
    annotations = one(rendered, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/scripts" in annotations, "a changed script must restart the pods"
    assert "initContainers" not in one(chart("default"), "Deployment")["spec"]["template"]["spec"]


def test_network_policy_limits_inference_to_the_given_peers():
    ingress = one(chart("networkpolicy"), "NetworkPolicy")["spec"]["ingress"]
    inference = next(rule for rule in ingress if {"port": "grpc", "protocol": "TCP"} in rule["ports"])
    assert inference["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "search-frontend"}}}]
    helpers = ingress[-1]["from"][0]["podSelector"]["matchLabels"]
    test_pod = one(chart("default"), "Pod")
    assert selects(helpers, test_pod["metadata"]["labels"]), "helm test must still reach the pods"


# --- catalog search ----------------------------------------------------------------------------------------

DNS_EGRESS = {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}


def milvus_egress(port: int = 19530, namespace: str | None = "milvus") -> dict:
    rule = {"ports": [{"port": port, "protocol": "TCP"}]}
    if namespace:
        rule["to"] = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}]
    return rule


def release_notes(*values_files: Path, sets: tuple[str, ...] = ()) -> str:
    command = [tools()["helm"], "install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client"]
    for path in values_files:
        command += ["--values", path]
    for assignment in sets:
        command += ["--set", assignment]
    result = run(command, env={**os.environ, "KUBECONFIG": os.devnull})
    assert result.returncode == 0, result.stderr
    return result.stdout.split("\nNOTES:\n")[1]


def test_network_policy_lets_the_pods_reach_milvus_only_when_asked():
    policy = one(chart("search-milvus"), "NetworkPolicy")["spec"]
    # An egress rule counts only in a policy of type Egress, and then everything not listed is denied:
    # DNS must be there to resolve the Milvus Service.
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["egress"] == [DNS_EGRESS, milvus_egress()]
    assert policy["ingress"] == one(chart("default"), "NetworkPolicy")["spec"]["ingress"], "ingress unchanged"
    moved = ("search.milvus.port=29530", "search.milvus.namespace=vectors")
    assert one(chart("search-milvus", sets=moved), "NetworkPolicy")["spec"]["egress"][1] == milvus_egress(
        29530, "vectors"
    )
    external = one(chart("search-milvus", sets=("search.milvus.namespace=",)), "NetworkPolicy")["spec"]["egress"]
    assert external[1] == milvus_egress(namespace=None), "a Milvus outside the cluster: any address on its port"
    for name, sets in [("search-milvus", ("search.milvus.enabled=false",)), ("networkpolicy", ()), ("default", ())]:
        spec = one(chart(name, sets=sets), "NetworkPolicy")["spec"]
        assert spec["policyTypes"] == ["Ingress"] and "egress" not in spec, f"{name} {sets}: egress stays open"
    assert not objects(chart("search-milvus", sets=("networkPolicy.enabled=false",)), "NetworkPolicy")


def test_milvus_egress_with_object_storage_needs_the_store_listed(tmp_path):
    files = (CI_VALUES["gcs"], CI_VALUES["search-milvus"])
    sets = ("search.indexVolume.existingClaim=catalog",)
    refused = run(helm_template_command(*files, sets=sets))
    assert refused.returncode != 0 and "networkPolicy.extraEgress" in refused.stderr, refused.stderr
    https = {"ports": [{"port": 443, "protocol": "TCP"}]}
    extra = tmp_path / "extra-egress-values.yaml"
    extra.write_text(yaml.safe_dump({"networkPolicy": {"extraEgress": [https]}}))
    rendered = documents(checked(helm_template_command(*files, extra, sets=sets)))
    assert one(rendered, "NetworkPolicy")["spec"]["egress"] == [DNS_EGRESS, milvus_egress(), https]
    spec = one(rendered, "Deployment")["spec"]["template"]["spec"]
    mount = next(m for m in triton(rendered)["volumeMounts"] if m["mountPath"] == "/catalog")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"] == {"claimName": "catalog", "readOnly": True} and mount["readOnly"]


def test_index_folder_is_mounted_where_the_search_model_looks():
    # serving_models/search.py: a relative index_dir is taken from the parent of the model repository
    # (Triton gives each model its folder, <repository>/search); the CLI takes it beside --repository.
    source = (REPO_ROOT / "src" / "ecomserve" / "serving_models" / "search.py").read_text()
    assert 'Path(args["model_repository"]).parents[1] / folder' in source, "the chart relies on this rule"
    rendered = chart("search-milvus")
    container = triton(rendered)
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    index_mount = {"name": "model-repository", "mountPath": "/catalog", "readOnly": True, "subPath": "catalog"}
    assert mounts["/catalog"] == index_mount, "the repository's claim, beside its folder, read-only"
    notes = release_notes(CI_VALUES["search-milvus"])
    index_dir = re.search(r"^    index_dir: (\S+)$", notes, re.MULTILINE).group(1)
    assert index_dir == "catalog/catalog_index"
    in_pods = PurePosixPath(flag(container, "model-repository"), "search").parents[1] / index_dir
    volume = PurePosixPath("/volume")  # where a Job or workstation mounts the claim
    written = volume / mounts["/models"]["subPath"] / ".." / index_dir  # `ecomserve index --repository`
    assert in_pods.parent == PurePosixPath(mounts["/catalog"]["mountPath"]), "the mount holds the index folder"
    assert PurePosixPath(os.path.normpath(written)).parent == volume / mounts["/catalog"]["subPath"]
    # The TensorRT init container's /models is the same path for Triton: same mount.
    trt = triton(chart("tensorrt", sets=("search.indexVolume.enabled=true",)))
    assert index_mount in trt["volumeMounts"]
    # Another claim, or a folder elsewhere: the notes ask for an absolute index_dir.
    for sets in [("search.indexVolume.existingClaim=catalog",), ("search.indexVolume.subPath=indexes",)]:
        assert "    index_dir: /catalog/catalog_index\n" in release_notes(CI_VALUES["search-milvus"], sets=sets)
    assert all(m["mountPath"] != "/catalog" for m in triton(chart("default"))["volumeMounts"])


def test_notes_say_how_the_spec_points_at_milvus():
    notes = release_notes(CI_VALUES["search-milvus"])
    assert "    backend: milvus\n" in notes and "      uri: http://milvus.milvus.svc.cluster.local:19530\n" in notes
    assert "egress to DNS (port 53) and Milvus (namespace milvus, port 19530)" in notes
    quiet = release_notes(CI_VALUES["search-milvus"], sets=("networkPolicy.enabled=false",))
    assert "uri: http://milvus.milvus.svc.cluster.local:19530" in quiet and "egress" not in quiet
    assert "Catalog search" not in release_notes()


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("image.tag=latest",), "/image/tag"),
        (("modelRepository.source=s3",), "modelRepository.s3.uri is required"),
        (("modelRepository.source=gcs",), "modelRepository.gcs.uri is required"),
        (("gpu.enabled=false", "tensorrt.enabled=true"), "tensorrt.enabled needs gpu.enabled"),
        (("rollout.strategy=reload", "triton.modelControl.mode=none"), "needs triton.modelControl.mode=explicit"),
        (("triton.adminKey.existingSecret=Admin_Key",), "/triton/adminKey/existingSecret"),
        (("triton.adminKey.secretKey=a/b",), "/triton/adminKey/secretKey"),
        (("podDisruptionBudget.minAvailable=2",), "must be below the smallest replica count"),
        (("modelRepository.source=ftp",), "/modelRepository/source"),
        (("triton.unknownKey=1",), "unknownKey"),
        (("modelRepository.s3.uri=http://bucket",), "/modelRepository/s3/uri"),
        (("podSecurityContext.runAsNonRoot=false",), "runAsNonRoot"),
        (
            ("search.indexVolume.enabled=true", "modelRepository.source=s3", "modelRepository.s3.uri=s3://b/p"),
            "search.indexVolume.existingClaim is required",
        ),
        (("search.indexVolume.enabled=true", "search.indexVolume.mountPath=/models/catalog"), "outside /models"),
        (("search.indexVolume.enabled=true", "search.indexVolume.mountPath=/opt"), "outside /opt"),
        (
            ("search.indexVolume.enabled=true", "search.indexVolume.subPath=model_repository/catalog"),
            "must lie beside modelRepository.pvc.subPath",
        ),
        (("search.indexVolume.mountPath=catalog",), "/search/indexVolume/mountPath"),
        (
            ("search.milvus.enabled=true", "modelRepository.source=gcs", "modelRepository.gcs.uri=gs://b/p"),
            "networkPolicy.extraEgress",
        ),
        (("search.milvus.port=0",), "/search/milvus/port"),
    ],
)
def test_bad_values_are_refused(sets, message):
    result = run(helm_template_command(sets=sets))
    assert result.returncode != 0, f"{sets} rendered"
    assert message in result.stderr, result.stderr


# --- kustomize stays in step with the chart ------------------------------------------------------------


def comparable(obj: dict) -> dict:
    """The object without what only Helm or only kustomize adds (labels, annotations, replicas)."""
    obj = json.loads(json.dumps(obj))
    obj["metadata"] = {"name": obj["metadata"]["name"]}
    if obj["kind"] == "Deployment":
        obj["spec"]["template"]["metadata"] = {"labels": obj["spec"]["selector"]["matchLabels"]}
    return obj


@pytest.mark.parametrize("profile", OVERLAYS)
def test_kustomize_overlay_matches_the_chart(profile):
    ours = {(o["kind"], o["metadata"]["name"]): comparable(o) for o in overlay(profile)}
    theirs = {(o["kind"], o["metadata"]["name"]): comparable(o) for o in chart(profile)}
    for key in [("Deployment", RELEASE), ("Service", RELEASE), ("Service", f"{RELEASE}-headless"),
                ("HorizontalPodAutoscaler", RELEASE), ("PodDisruptionBudget", RELEASE),
                ("NetworkPolicy", RELEASE), ("PersistentVolumeClaim", f"{RELEASE}-models"),
                ("ServiceAccount", RELEASE)]:  # fmt: skip
        assert ours[key] == theirs[key], f"{profile}: {key} differs between k8s/kustomize and the chart"


# --- Dockerfile --------------------------------------------------------------------------------------------


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
    assert any("pip install --no-cache-dir ." in line for line in lines), "dependencies come from pyproject.toml"
    ignored = (K8S / "Dockerfile.dockerignore").read_text()
    assert "!pyproject.toml" in ignored and "!src/" in ignored


# --- the scripts the chart ships -----------------------------------------------------------------------------


def write_executable(path: Path, body: str) -> None:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)


# trtexec's stand-in: logs each call (arguments and working directory); a build checks the ONNX file
# and the relative --calib= file and writes a plan; a check run (--loadEngine) reads the check files
# from its working directory and exports the expected rows, or rows perturbed or NaN per FAKE_TRT_OUTPUT,
# in trtexec's --exportOutput format (which prints NaN as a bare nan).
FAKE_TRTEXEC = """\
import json, os, sys
import numpy as np
print('&&&& RUNNING TensorRT.trtexec [TensorRT v100500] # trtexec')
args = dict(a.lstrip('-').split('=', 1) for a in sys.argv[1:] if '=' in a)
with open(os.environ['FAKE_TRT_CALLS'], 'a') as calls:
    calls.write(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd()}) + '\\n')
if 'saveEngine' in args:
    if 'calib' in args and not os.path.isfile(args['calib']):
        sys.exit(f"cannot open calibration cache {args['calib']} in {os.getcwd()}")
    open(args['saveEngine'], 'wb').write(b'plan for ' + open(args['onnx'], 'rb').read())
if 'loadEngine' in args:
    assert open(args['loadEngine'], 'rb').read().startswith(b'plan for ')
    inputs = dict(item.split(':') for item in args['loadInputs'].split(','))
    batch, sequence = (int(n) for n in args['shapes'].split(',')[0].split(':')[1].split('x'))
    assert all(os.path.getsize(file) == batch * sequence * 8 for file in inputs.values())
    rows = np.fromfile('check_expected.bin', dtype='<f4').reshape(batch, -1)
    mode = os.environ.get('FAKE_TRT_OUTPUT', 'exact')
    if mode == 'perturbed':
        rows = rows + np.random.default_rng(0).normal(0, 0.1, rows.shape).astype(np.float32)
    values = ', '.join('nan' if mode == 'nan' and i == 3 else repr(float(v)) for i, v in enumerate(rows.ravel()))
    with open(args['exportOutput'], 'w') as out:
        out.write('[\\n  { "name" : "embedding"\\n  , "dimensions" : "%dx%d"\\n  , "values" : [ %s ]\\n  }\\n]\\n'
                  % (rows.shape[0], rows.shape[1], values))
"""


class EngineStandIns:
    """A model repository, trtexec and nvidia-smi stand-ins, and runs of build_engines.py against them."""

    def __init__(self, tmp_path: Path):
        self.source, self.serving, self.cache = tmp_path / "repository", tmp_path / "serving", tmp_path / "cache"
        self.engines, self.calls, self.bin_dir = tmp_path / "engines.json", tmp_path / "trtexec-calls", tmp_path / "bin"
        self.bin_dir.mkdir()
        write_executable(self.bin_dir / "nvidia-smi", "print('NVIDIA H100 80GB HBM3')\n")
        write_executable(self.bin_dir / "trtexec", FAKE_TRTEXEC)
        self.version_dir = self.source / "encoder_trt" / "1"
        self.version_dir.mkdir(parents=True)
        (self.source / "encoder_trt" / "config.pbtxt").write_text('platform: "tensorrt_plan"\n')
        (self.version_dir / "model.onnx").write_bytes(b"onnx v1")
        (self.source / "embed" / "1").mkdir(parents=True)

    def write_manifest(self, min_cosine: float = 0.999) -> dict:
        """tensorrt_engines.json and the check files, as `ecomserve build --target tensorrt` writes them."""
        rng = np.random.default_rng(1)
        input_ids = rng.integers(1, 1000, (5, 7)).astype("<i8")
        expected = rng.normal(size=(5, 16)).astype("<f4")
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
        (self.version_dir / "check_input_ids.bin").write_bytes(input_ids.tobytes())
        (self.version_dir / "check_attention_mask.bin").write_bytes(np.ones_like(input_ids).tobytes())
        (self.version_dir / "check_expected.bin").write_bytes(expected.tobytes())
        (self.version_dir / "calibration.cache").write_text("TRT-100500-EntropyCalibration2\n")
        engine = {
            "model": "encoder_trt", "version": "1", "onnx": "model.onnx",
            "trtexecArgs": ["--minShapes=input_ids:1x1,attention_mask:1x1", "--fp16", "--int8",
                            "--calib=calibration.cache"],
            "check": {
                "shapes": "input_ids:5x7,attention_mask:5x7",
                "inputs": {"input_ids": "check_input_ids.bin", "attention_mask": "check_attention_mask.bin"},
                "output": "embedding", "expected": "check_expected.bin", "dim": 16, "min_cosine": min_cosine,
            },
        }  # fmt: skip
        (self.source / "tensorrt_engines.json").write_text(json.dumps([engine], indent=2))
        return engine

    def run(self, values_engines: list, output: str = "exact") -> subprocess.CompletedProcess:
        self.engines.write_text(json.dumps(values_engines))
        self.serving.mkdir(exist_ok=True)
        env = {
            **os.environ, "PATH": f"{self.bin_dir}{os.pathsep}{os.environ['PATH']}",
            "SOURCE_REPOSITORY": str(self.source), "SERVING_REPOSITORY": str(self.serving),
            "ENGINE_CACHE": str(self.cache), "ENGINES_FILE": str(self.engines),
            "FAKE_TRT_CALLS": str(self.calls), "FAKE_TRT_OUTPUT": output,
        }  # fmt: skip
        env.pop("TRT_VERSION", None)
        # -S: no site-packages, as in the TensorRT image (no numpy there).
        return run([sys.executable, "-S", CHART / "files" / "build_engines.py"], env=env)

    def trtexec_calls(self, flag: str) -> list[dict]:
        """The calls with `flag` (--saveEngine: builds, --loadEngine: checks), --help excluded."""
        if not self.calls.exists():
            return []
        calls = [json.loads(line) for line in self.calls.read_text().splitlines()]
        return [call for call in calls if any(arg.startswith(f"{flag}=") for arg in call["argv"])]

    def plans(self) -> list[Path]:
        return sorted(self.cache.glob("*/*/encoder_trt/*/model.plan*"))


def test_engine_build_caches_plans_per_gpu_and_tensorrt(tmp_path):
    trt = EngineStandIns(tmp_path)

    def build(args: list[str]) -> subprocess.CompletedProcess:
        return trt.run([{"model": "encoder_trt", "version": "1", "onnx": "model.onnx", "trtexecArgs": args}])

    first = build(["--fp16"])
    assert first.returncode == 0, first.stderr
    (plan,) = trt.plans()
    assert plan.relative_to(trt.cache).parts[:2] == ("nvidia-h100-80gb-hbm3", "trt-100500")
    assert plan.read_bytes() == b"plan for onnx v1"
    (build_call,) = trt.trtexec_calls("--saveEngine")
    assert build_call["cwd"] == str(trt.version_dir), "trtexec runs in the version folder"
    assert json.loads((plan.parent / "build.json").read_text())["check"] is None
    served = trt.serving
    assert (served / "embed").resolve() == (trt.source / "embed").resolve()
    assert (served / "encoder_trt" / "1" / "model.plan").resolve() == plan.resolve()
    config = (trt.source / "encoder_trt" / "config.pbtxt").resolve()
    assert (served / "encoder_trt" / "config.pbtxt").resolve() == config
    assert build(["--fp16"]).returncode == 0
    assert len(trt.trtexec_calls("--saveEngine")) == 1, "the cached plan must be reused"
    assert build(["--fp16", "--builderOptimizationLevel=5"]).returncode == 0
    assert len(trt.trtexec_calls("--saveEngine")) == 2, "new trtexec flags must build a new plan"
    assert not trt.trtexec_calls("--loadEngine"), "an engine without a check is not run"
    (trt.version_dir / "model.onnx").unlink()
    missing = build(["--fp16"])
    assert missing.returncode == 1 and "tensorrt.engines[0]" in missing.stderr


def test_engine_build_reads_the_repository_manifest_and_checks_the_plan(tmp_path):
    trt = EngineStandIns(tmp_path)
    trt.write_manifest()
    trt.version_dir.chmod(0o555)  # the repository volume is mounted read-only
    try:
        result = trt.run([])
    finally:
        trt.version_dir.chmod(0o755)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tensorrt_engines.json" in result.stdout
    (plan,) = trt.plans()
    (build_call,) = trt.trtexec_calls("--saveEngine")
    assert build_call["cwd"] == str(trt.version_dir) and "--calib=calibration.cache" in build_call["argv"]
    (check_call,) = trt.trtexec_calls("--loadEngine")
    assert check_call["cwd"] == str(trt.version_dir)
    args = dict(arg.split("=", 1) for arg in check_call["argv"])
    assert args["--shapes"] == "input_ids:5x7,attention_mask:5x7"
    assert args["--loadInputs"] == "input_ids:check_input_ids.bin,attention_mask:check_attention_mask.bin"
    for absolute in ("--loadEngine", "--exportOutput"):
        assert Path(args[absolute]).is_absolute() and trt.source not in Path(args[absolute]).parents
    assert Path(args["--loadEngine"]).parent == plan.parent, "the plan is checked before it takes its name"
    record = json.loads((plan.parent / "build.json").read_text())
    assert record["check"]["min_cosine"] == pytest.approx(1.0, abs=1e-5) and record["check"]["texts"] == 5
    assert (trt.serving / "encoder_trt" / "1" / "model.plan").resolve() == plan.resolve()
    assert (trt.serving / "encoder_trt" / "1" / "check_expected.bin").is_file()

    again = trt.run([])
    assert again.returncode == 0, again.stderr
    assert len(trt.trtexec_calls("--saveEngine")) == len(trt.trtexec_calls("--loadEngine")) == 1, (
        "a cached plan is neither rebuilt nor checked again"
    )


def test_engines_in_values_replace_the_repository_manifest(tmp_path):
    trt = EngineStandIns(tmp_path)
    manifest_entry = trt.write_manifest()
    override = {**manifest_entry, "trtexecArgs": ["--fp16"]}
    del override["check"]
    result = trt.run([override])
    assert result.returncode == 0, result.stderr
    (build_call,) = trt.trtexec_calls("--saveEngine")
    assert build_call["argv"][2:] == ["--fp16"] and not trt.trtexec_calls("--loadEngine")
    checked_override = trt.run([{**override, "trtexecArgs": ["--fp16", "--noTF32"], "check": manifest_entry["check"]}])
    assert checked_override.returncode == 0, checked_override.stderr
    assert len(trt.trtexec_calls("--loadEngine")) == 1, "a check given in values runs too"


@pytest.mark.parametrize(("output", "worst"), [("perturbed", r"0\.\d+"), ("nan", "nan")])
def test_engine_failing_its_check_is_deleted_and_stops_the_pod(tmp_path, output, worst):
    trt = EngineStandIns(tmp_path)
    trt.write_manifest(min_cosine=0.999)
    result = trt.run([], output=output)
    assert result.returncode == 1, result.stdout
    (error,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert re.search(rf"error: encoder_trt: .*min cosine {worst} < 0\.999 .*plan was deleted", error), error
    assert trt.plans() == [], "no plan (nor partial file) may stay in the cache"
    assert not (trt.serving / "encoder_trt").exists(), "nothing is served"
    assert len(trt.trtexec_calls("--saveEngine")) == 1


def test_engine_build_needs_values_or_a_manifest(tmp_path):
    result = EngineStandIns(tmp_path).run([])
    assert result.returncode == 1
    assert "tensorrt.engines is empty and the repository has no tensorrt_engines.json" in result.stderr


ADMIN_KEY = "k3y-for-the-stand-in_0"
# The repository index of a release with a split layout (one entry per model version, as Triton lists them).
RELEASE_INDEX = [
    {"name": "classify", "version": "1", "state": "READY"},
    {"name": "embed", "version": "2", "state": "READY"},
    {"name": "fusion", "version": "1", "state": "READY"},
    {"name": "fusion", "version": "2", "state": "READY"},
    {"name": "minilm_encoder", "version": "2", "state": "READY"},
    {"name": "minilm_tokenizer", "version": "2", "state": "READY"},
    {"name": "rank", "version": "1", "state": "READY"},
]


class FakeTriton(BaseHTTPRequestHandler):
    """Triton's HTTP API as the reload Job sees it, through the front: the repository API refuses requests
    without the admin key (403, the front's message); loading `broken` fails; `embed` answers not ready
    `not_ready_polls` times, then ready. Records (method, path, admin header) of every call."""

    calls: list[tuple[str, str, str | None]] = []
    not_ready_polls = 0

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self._record()
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("ecomserve-admin-key") != ADMIN_KEY:
            self._answer({"error": f"{self.path} needs the admin key in the ecomserve-admin-key header"}, 403)
        elif self.path == "/v2/repository/index":
            self._answer(RELEASE_INDEX, 200)
        elif self.path.endswith("/broken/load"):
            self._answer({"error": "failed to load 'broken'"}, 400)
        else:
            self._answer({}, 200)

    def do_GET(self):  # noqa: N802
        self._record()
        if self.path == "/v2/models/embed/ready":
            ready = FakeTriton.not_ready_polls <= 0
            FakeTriton.not_ready_polls -= 1
            self._answer({} if ready else {"error": "model not ready"}, 200 if ready else 400)
        elif self.path == "/v2/models/embed":
            self._answer({"name": "embed", "versions": ["2"], "platform": "ensemble"}, 200)
        else:
            self._answer({"error": "unknown"}, 404)

    def _record(self):
        self.calls.append((self.command, self.path, self.headers.get("ecomserve-admin-key")))

    def _answer(self, body, status: int):
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_triton():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTriton)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def reload(models: str = "", key: str = ADMIN_KEY, not_ready_polls: int = 0, timeout_s: int = 30):
        FakeTriton.calls, FakeTriton.not_ready_polls = [], not_ready_polls
        env = {
            **os.environ, "TRITON_SERVICE": "127.0.0.1", "TRITON_HTTP_PORT": str(server.server_port),
            "RELOAD_MODELS": models, "ECOMSERVE_ADMIN_KEY": key, "LOAD_TIMEOUT_S": str(timeout_s),
        }  # fmt: skip
        return run([sys.executable, CHART / "files" / "reload_models.py"], env=env)

    yield reload
    server.shutdown()
    server.server_close()


def test_reload_job_loads_the_release_on_every_pod_embed_last(fake_triton):
    result = fake_triton(not_ready_polls=1)
    assert result.returncode == 0, result.stdout + result.stderr
    repository_calls = [call for call in FakeTriton.calls if call[1].startswith("/v2/repository/")]
    assert [(method, path) for method, path, _ in repository_calls] == [
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/fusion/load"),
        ("POST", "/v2/repository/models/minilm_encoder/load"),
        ("POST", "/v2/repository/models/minilm_tokenizer/load"),
        ("POST", "/v2/repository/models/embed/load"),
    ], "every versioned model once, in index order, embed last; rank and classify are not reloaded"
    assert all(key == ADMIN_KEY for _, _, key in repository_calls), "every repository call needs the admin key"
    others = [call for call in FakeTriton.calls if call not in repository_calls]
    assert others[:2] == [("GET", "/v2/models/embed/ready", None)] * 2, "waits until embed is ready"
    assert all(key is None for _, _, key in others), "the key goes to the repository API only"
    assert FakeTriton.calls.index(others[0]) > FakeTriton.calls.index(repository_calls[-1]), "ready after the loads"
    assert "embed ready, serving release 2" in result.stdout
    assert ADMIN_KEY not in result.stdout + result.stderr
    # The pods' front passes each of these calls on: the repository API with the key, the rest to anyone.
    script = (CHART / "files" / "reload_models.py").read_text()
    assert f'ADMIN_HEADER = "{front_policy.ADMIN_HEADER}"' in script
    for method, path, key in FakeTriton.calls:
        expected = front_policy.Access.ADMIN if key else front_policy.Access.OPEN
        assert front_policy.http_access(method, path)[0] is expected, (method, path)


def test_reload_job_fails_on_a_refused_or_failed_load_or_embed_not_ready(fake_triton):
    wrong_key = fake_triton(key="not-the-key")
    assert wrong_key.returncode == 1
    refused = "repository index: HTTP 403: /v2/repository/index needs the admin key in the ecomserve-admin-key header"
    assert refused in wrong_key.stderr
    assert "not-the-key" not in wrong_key.stdout + wrong_key.stderr
    failed = fake_triton("rank,broken")
    assert failed.returncode == 1
    assert "broken: HTTP 400: failed to load 'broken'" in failed.stderr
    assert [path for _, path, _ in FakeTriton.calls][:2] == [
        "/v2/repository/models/rank/load", "/v2/repository/models/broken/load"
    ], "an explicit rollout.reload.models list is loaded as given"  # fmt: skip
    never_ready = fake_triton(not_ready_polls=100, timeout_s=1)
    assert never_ready.returncode == 1
    assert "embed: not ready after 1 s (HTTP 400: model not ready)" in never_ready.stderr
