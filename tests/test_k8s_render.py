"""Every chart render (the defaults and each ci/*-values.yaml) and both kustomize overlays: `helm lint
--strict`, the real API schemas of several Kubernetes releases (kubernetes-validate, strict: unknown fields
fail), and values the chart's schema or templates refuse.

Checked without a cluster, like every tests/test_k8s_*.py (helpers: tests/k8s_tools.py)."""

from __future__ import annotations

import kubernetes_validate
import pytest
from k8s_tools import (
    ALL_RENDERS,
    CHART,
    CI_VALUES,
    checked,
    helm_template_command,
    render,
    run,
    tools,
)

# The oldest release the chart supports (Chart.yaml kubeVersion), kubectl's, and the newest schemas.
KUBERNETES_VERSIONS = ["1.29", "1.33", "1.35"]
# Custom resources have no schema in kubernetes-validate: checked structurally
# (test_service_monitor_only_where_the_api_exists).
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor")}


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
        (("apiKey.create=true", "apiKey.existingSecret=shop-inference"), "apiKey: set existingSecret"),
        (("apiKey.existingSecret=Shop_Key",), "/apiKey/existingSecret"),
        (("apiKey.secretKey=a/b",), "/apiKey/secretKey"),
        (("apiKey.create=yes",), "/apiKey/create"),
        (("service.apiPort=0",), "/service/apiPort"),
        (("triton.ports.api=8000",), "four different ports"),
    ],
)
def test_bad_values_are_refused(sets, message):
    result = run(helm_template_command(sets=sets))
    assert result.returncode != 0, f"{sets} rendered"
    assert message in result.stderr, result.stderr
