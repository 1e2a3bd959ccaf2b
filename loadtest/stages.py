"""Load shapes as data. A shape is a list of stages; each holds its user count until `until_s` seconds after the
test started (a cumulative end time, not a duration). wiring.ScenarioShape walks the list; no Locust here."""

from __future__ import annotations

from dataclasses import dataclass

SHAPES = ("step", "spike", "soak")


@dataclass(frozen=True)
class Stage:
    until_s: float
    users: int
    spawn_rate: float  # users started or stopped per second on the way to `users`


def step(users: int, stage_s: float) -> list[Stage]:
    """1, 2, 4 … `users`, each held for stage_s seconds: throughput stops growing at the saturation knee."""
    counts = [1 << i for i in range(users.bit_length()) if 1 << i < users] + [users]
    return [Stage(until_s=stage_s * (i + 1), users=n, spawn_rate=float(n)) for i, n in enumerate(counts)]


def spike(users: int, stage_s: float) -> list[Stage]:
    """A base of users/8 for two stages, all `users` within a second for one stage, the base again for two: does
    latency recover after the burst, and does the bounded queue refuse rather than pile up?"""
    base = max(1, users // 8)
    return [
        Stage(until_s=2 * stage_s, users=base, spawn_rate=float(base)),
        Stage(until_s=3 * stage_s, users=users, spawn_rate=float(users)),
        Stage(until_s=5 * stage_s, users=base, spawn_rate=float(users)),
    ]


def soak(users: int, stage_s: float, soak_s: float) -> list[Stage]:
    """Ramp to `users` over one stage, then hold them for soak_s seconds: memory growth and latency drift."""
    return [
        Stage(until_s=stage_s, users=users, spawn_rate=users / stage_s),
        Stage(until_s=stage_s + soak_s, users=users, spawn_rate=float(users)),
    ]


def build(shape: str, users: int, stage_s: float, soak_s: float) -> list[Stage]:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")
    if users < 1 or stage_s <= 0 or soak_s <= 0:
        raise ValueError(f"a shape needs users >= 1 and positive durations, got {users=}, {stage_s=}, {soak_s=}")
    if shape == "step":
        return step(users, stage_s)
    if shape == "spike":
        return spike(users, stage_s)
    return soak(users, stage_s, soak_s)


def stage_at(stages: list[Stage], elapsed_s: float) -> Stage | None:
    """The stage running `elapsed_s` seconds into the test; None once the last one has ended."""
    return next((stage for stage in stages if elapsed_s < stage.until_s), None)
