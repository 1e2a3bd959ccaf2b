"""The chart's profiles and features: object-storage and PVC model repositories, new revisions (rolled pods
or a model reload Job), TensorRT engines built in an init container.

Checked without a cluster, like every tests/test_k8s_*.py (helpers: tests/k8s_tools.py)."""

from __future__ import annotations

import json

import yaml
from k8s_tools import (
    CHART,
    CI_VALUES,
    GPU_RESOURCE,
    NAMESPACE,
    RELEASE,
    chart,
    checked,
    documents,
    flag,
    helm_template_command,
    objects,
    one,
    run,
    triton,
)


def test_object_storage_repositories():
    s3 = chart("s3")
    container = triton(s3)
    assert flag(container, "model-repository") == "s3://ecomserve-models/model_repository"
    secrets = {env["name"]: env["valueFrom"]["secretKeyRef"]["name"] for env in container["env"] if "valueFrom" in env}
    # S3 credentials and the admin key are mounted files (AWS_SHARED_CREDENTIALS_FILE, --admin-key-file).
    assert secrets == {}
    env = {item["name"]: item.get("value") for item in container["env"]}
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    assert mounts["s3-credentials"]["readOnly"] is True
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == f"{mounts['s3-credentials']['mountPath']}/credentials"
    volumes = {volume["name"]: volume for volume in one(s3, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["s3-credentials"]["secret"]["secretName"] == "ecomserve-s3-credentials"
    assert volumes["s3-credentials"]["secret"]["items"] == [{"key": "credentials", "path": "credentials"}]
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
