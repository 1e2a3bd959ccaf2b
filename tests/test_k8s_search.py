"""Catalog search in the chart: egress to Milvus only when asked, the index folder mounted where the
`search` model looks, and the release notes that say how the spec points at Milvus.

Checked without a cluster, like every tests/test_k8s_*.py (helpers: tests/k8s_tools.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

import yaml
from k8s_tools import (
    CHART,
    CI_VALUES,
    NAMESPACE,
    RELEASE,
    REPO_ROOT,
    chart,
    checked,
    documents,
    flag,
    helm_template_command,
    objects,
    one,
    run,
    tools,
    triton,
)

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
