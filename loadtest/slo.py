"""The SLO gate: a run passes when its p95 and p99 latencies and its failure ratio are within the limits.
Plain arithmetic, no Locust; wiring.py feeds it the run's totals and turns violations into the exit code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Slo:
    p95_ms: float = 0.0  # 0: no limit
    p99_ms: float = 0.0  # 0: no limit
    fail_ratio: float = 0.0  # largest allowed failures / requests


@dataclass(frozen=True)
class Totals:
    requests: int
    failures: int
    p95_ms: float
    p99_ms: float
    exceptions: int = 0  # errors raised by the load test's own code

    @property
    def fail_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def violations(slo: Slo, totals: Totals) -> list[str]:
    """One sentence per broken limit; empty when the run passes."""
    if totals.requests == 0:
        return ["no requests were made"]
    problems = []
    for name, limit, value in (("p95", slo.p95_ms, totals.p95_ms), ("p99", slo.p99_ms, totals.p99_ms)):
        if limit > 0 and value > limit:
            problems.append(f"{name} {value:g} ms > {limit:g} ms")
    if totals.fail_ratio > slo.fail_ratio:
        problems.append(
            f"failure ratio {totals.fail_ratio:.4f} ({totals.failures} of {totals.requests}) > {slo.fail_ratio:g}"
        )
    if totals.exceptions:
        problems.append(f"{totals.exceptions} exceptions in the load test's own code (see the Locust log)")
    return problems


def describe(slo: Slo, totals: Totals) -> str:
    return (
        f"{totals.requests} requests, p95 {totals.p95_ms:g} ms ({_limit(slo.p95_ms)}), "
        f"p99 {totals.p99_ms:g} ms ({_limit(slo.p99_ms)}), "
        f"failure ratio {totals.fail_ratio:.4f} (limit {slo.fail_ratio:g})"
    )


def _limit(ms: float) -> str:
    return f"limit {ms:g} ms" if ms > 0 else "no limit"
