"""The Triton pods of every render: probes and Services on the container ports (the HTTP API's included),
/dev/shm and writable scratch, selectors that match the pods only, pinned images, resources, rollouts and
graceful shutdown.

Checked without a cluster, like every tests/test_k8s_*.py (helpers: tests/k8s_tools.py)."""

from __future__ import annotations

import pytest
from k8s_tools import (
    ALL_RENDERS,
    GPU_RESOURCE,
    RELEASE,
    SUPERVISOR,
    chart,
    containers,
    flag,
    objects,
    one,
    pod_templates,
    render,
    selects,
    supervisor_flag,
    triton,
)


@pytest.mark.parametrize("source", ALL_RENDERS)
def test_probes_and_services_use_the_container_ports(source):
    rendered = render(source)
    container = triton(rendered)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert set(ports) == {"http", "grpc", "metrics", "api"}
    # The front listens on every port, the HTTP API's too, on every address of the pod; Triton only on unix
    # sockets.
    for name in ("http", "grpc", "metrics", "api"):
        assert ports[name] == int(supervisor_flag(container, f"{name}-port")), name
    assert ports["api"] == 8080, "the HTTP API's default port"
    assert supervisor_flag(container, "host") == "0.0.0.0"
    ready, live = "/v2/health/ready", "/v2/health/live"
    for probe, path in {"startupProbe": ready, "readinessProbe": ready, "livenessProbe": live}.items():
        http_get = container[probe]["httpGet"]
        assert (http_get["path"], http_get["port"]) == (path, "http"), f"{probe} must call {path} on the http port"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "large models need >= 10 min to load"
    for service in objects(rendered, "Service"):
        service_ports = {port["name"]: port for port in service["spec"]["ports"]}
        assert set(service_ports) == {"http", "grpc", "metrics", "api"}
        for name, port in service_ports.items():
            # service.apiPort is the container's port by default (test_api_service_port_is_its_own).
            assert port["targetPort"] == name and port["port"] == ports[name]
        assert service_ports["grpc"]["appProtocol"] == "grpc"
        assert service_ports["api"]["appProtocol"] == "http"


def test_api_service_port_is_its_own():
    rendered = chart("default", sets=("service.apiPort=80",))
    assert supervisor_flag(triton(rendered), "api-port") == "8080", "the container keeps triton.ports.api"
    services = objects(rendered, "Service")
    ports = {svc["metadata"]["name"]: {port["name"]: port for port in svc["spec"]["ports"]} for svc in services}
    assert (ports[RELEASE]["api"]["port"], ports[RELEASE]["api"]["targetPort"]) == (80, "api")
    # A headless Service translates no port: its clients reach the container's port directly.
    assert ports[f"{RELEASE}-headless"]["api"]["port"] == 8080
    moved = triton(chart("default", sets=("triton.ports.api=9090",)))
    assert supervisor_flag(moved, "api-port") == "9090"
    assert {port["name"]: port["containerPort"] for port in moved["ports"]}["api"] == 9090


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
