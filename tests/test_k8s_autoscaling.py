"""Autoscaling and metrics: the HPA's metrics served by the prometheus-adapter rules, dashboards and rules
that use only metrics Triton and ecomserve expose, and the ServiceMonitor only where its API exists.

Checked without a cluster, like every tests/test_k8s_*.py (helpers: tests/k8s_tools.py)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from k8s_tools import (
    ALL_RENDERS,
    CHART,
    K8S,
    NAMESPACE,
    RELEASE,
    chart,
    objects,
    one,
    render,
    selects,
)

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


def adapter_rules(rendered: list[dict]) -> list[dict]:
    config_map = one(rendered, "ConfigMap", f"{RELEASE}-adapter-rules")
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def adapter_values_rules() -> list[dict]:
    return yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]


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
