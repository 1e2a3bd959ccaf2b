"""`ecomserve bench --workload latency` without a server: each setting's spec, the fresh texts, and the split of
Triton's statistics into mean milliseconds per request."""

from __future__ import annotations

from pathlib import Path

from ecomserve.bench.latency import BATCH, SETTINGS, FreshTexts, phase_breakdown, setting_spec
from ecomserve.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def test_each_setting_changes_only_its_serving_fields_and_turns_the_cache_off():
    spec = load_spec(ROOT / "export/default.yaml")
    assert set(SETTINGS) >= {"spec", "500 µs batching delay", "one thread always"}
    for change in SETTINGS.values():
        changed = setting_spec(spec, change)
        assert changed.serving.response_cache is False
        assert changed.encoders == spec.encoders and changed.search == spec.search
        delay = change.get("max_queue_delay_us", spec.serving.dynamic_batching.max_queue_delay_us)
        assert changed.serving.dynamic_batching.max_queue_delay_us == delay
        assert changed.serving.idle_threads == change.get("idle_threads", spec.serving.idle_threads)
        assert changed.serving.instances == spec.serving.instances


def test_fresh_texts_never_repeat():
    texts = FreshTexts()
    sent = [texts.query(i) for i in range(1000)] + [t for i in range(20) for t in texts.titles(i)]
    assert len(set(sent)) == len(sent) == 1000 + 20 * BATCH


def test_phase_breakdown_is_the_mean_per_request_between_two_readings():
    before = {"count": 10, "success": 50_000_000, "queue": 5_000_000, "compute_input": 1_000_000}
    before |= {"compute_infer": 40_000_000, "compute_output": 1_000_000}
    after = {"count": 14, "success": 70_000_000, "queue": 6_000_000, "compute_input": 1_400_000}
    after |= {"compute_infer": 58_000_000, "compute_output": 1_200_000}
    found = phase_breakdown(before, after)
    assert found["requests"] == 4
    assert found["success_ms"] == 5.0 and found["queue_ms"] == 0.25 and found["compute_infer_ms"] == 4.5
    assert phase_breakdown(before, before) == {}


def test_a_setting_reuses_the_built_encoders_with_its_own_configs(tmp_path):
    from support import make_tiny_bert, spec_from

    from ecomserve.bench.latency import respecified
    from ecomserve.repository.builder import build_repository, built_spec

    spec = spec_from({"encoders": [{"name": "tiny", "source": str(make_tiny_bert(tmp_path / "tiny", 4))}]})
    built = tmp_path / "built"
    build_repository(spec, built)
    change = {"max_queue_delay_us": 0, "idle_threads": 2}
    target = respecified(built, setting_spec(spec, change), tmp_path, tmp_path / "copy")
    assert built_spec(target) == setting_spec(spec, change) and built_spec(built) == spec
    before, after = ((folder / "embedder" / "config.pbtxt").read_text() for folder in (built, target))
    assert "max_queue_delay_microseconds: 500" in before and "max_queue_delay_microseconds" not in after  # 0
    assert 'key: "idle_threads"\n  value {\n    string_value: "2"' in after
    caches = [(folder / "embed" / "config.pbtxt").read_text() for folder in (built, target)]
    assert "enable: true" in caches[0] and "enable: true" not in caches[1]  # the response cache is off
    files = sorted(p.relative_to(built) for p in built.rglob("*.onnx"))
    assert files and files == sorted(p.relative_to(target) for p in target.rglob("*.onnx"))
