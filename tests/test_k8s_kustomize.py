"""The kustomize overlays stay in step with the chart: the same objects, less what only Helm or only
kustomize adds.

Checked without a cluster, like every tests/test_k8s_*.py (helpers: tests/k8s_tools.py)."""

from __future__ import annotations

import json

import pytest
from k8s_tools import (
    OVERLAYS,
    RELEASE,
    chart,
    overlay,
)

# What the chart's objects are called in the overlays (they name no generated Secret).
SAME_OBJECTS = [
    ("Deployment", RELEASE), ("Service", RELEASE), ("Service", f"{RELEASE}-headless"),
    ("HorizontalPodAutoscaler", RELEASE), ("PodDisruptionBudget", RELEASE), ("NetworkPolicy", RELEASE),
    ("PersistentVolumeClaim", f"{RELEASE}-models"), ("ServiceAccount", RELEASE),
]  # fmt: skip


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
    for key in SAME_OBJECTS:
        assert ours[key] == theirs[key], f"{profile}: {key} differs between k8s/kustomize and the chart"


def test_api_key_component_matches_the_chart():
    """components/api-key on the GPU overlay is the chart's apiKey.existingSecret=<release>-api-key."""
    ours = {(o["kind"], o["metadata"]["name"]): comparable(o) for o in overlay("gpu", ("api-key",))}
    sets = (f"apiKey.existingSecret={RELEASE}-api-key",)
    theirs = {(o["kind"], o["metadata"]["name"]): comparable(o) for o in chart("gpu", sets=sets)}
    for key in SAME_OBJECTS:
        assert ours[key] == theirs[key], f"gpu+api-key: {key} differs between k8s/kustomize and the chart"
