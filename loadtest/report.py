"""Throughput and latency against user count, drawn from Locust's stats history CSV.

`locust … --csv PREFIX` writes PREFIX_stats_history.csv, one row a second; the locustfile draws PREFIX_plot.png
from it when the run ends, and this script draws it again afterwards (and prints the table behind it):

    python loadtest/report.py bench_results/step_stats_history.csv [-o bench_results/step.png]

Throughput and mean latency per user count are differences of Locust's running totals over the seconds spent
at that count (whole-second timestamps: ±1 s on each stage's duration). p50/p95 per user count need
--csv-full-history, which makes the Aggregated row's percentiles cover only the last ~10 s (Locust's "current"
window; keep stages at least that long); without it they are cumulative over the whole run and are left out.
No Locust import: this runs anywhere matplotlib does."""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

HISTORY_SUFFIX = "_stats_history.csv"
PLOT_SUFFIX = "_plot.png"


class ReportError(Exception):
    """The history holds nothing to plot, or is not a Locust stats history."""


@dataclass(frozen=True)
class Sample:
    """One second of the run: the Aggregated row."""

    time_s: int
    users: int
    requests: int  # running totals from here on
    failures: int
    mean_ms: float
    p50_ms: float | None
    p95_ms: float | None


@dataclass(frozen=True)
class Level:
    """The run at one user count (all the seconds spent at it)."""

    users: int
    seconds: int
    rps: float
    fail_rps: float
    mean_ms: float
    p50_ms: float | None  # None unless the history has current percentiles
    p95_ms: float | None


def plot_path_for(csv_prefix: str) -> Path:
    return Path(f"{csv_prefix}{PLOT_SUFFIX}")


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:  # "N/A" before the first request
        return None


def read_history(path: Path) -> tuple[list[Sample], bool]:
    """The Aggregated samples, and whether their percentiles are current (--csv-full-history) or cumulative."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    required = {
        "Timestamp",
        "User Count",
        "Name",
        "Total Request Count",
        "Total Failure Count",
        "Total Average Response Time",
    }
    if not rows or not required <= set(rows[0]):
        raise ReportError(f"{path}: not a Locust stats history (expected the columns {sorted(required)})")
    samples = [
        Sample(
            time_s=int(row["Timestamp"]),
            users=int(row["User Count"]),
            requests=int(row["Total Request Count"]),
            failures=int(row["Total Failure Count"]),
            mean_ms=float(row["Total Average Response Time"]),
            p50_ms=_number(row.get("50%", "N/A")),
            p95_ms=_number(row.get("95%", "N/A")),
        )
        for row in rows
        if row["Name"] == "Aggregated"
    ]
    return samples, any(row["Name"] != "Aggregated" for row in rows)


def levels(samples: list[Sample], current_percentiles: bool) -> list[Level]:
    """One Level per user count, from the stretches of consecutive seconds spent at it (ramps between stages
    are too short to count)."""
    totals: dict[int, list[float]] = {}  # users -> [seconds, requests, failures, response time sum]
    last: dict[int, Sample] = {}
    for users, stretch in groupby(samples, key=lambda sample: sample.users):
        stretch = list(stretch)
        first, final = stretch[0], stretch[-1]
        if users < 1 or final.time_s <= first.time_s or final.requests <= first.requests:
            continue
        total = totals.setdefault(users, [0.0, 0.0, 0.0, 0.0])
        total[0] += final.time_s - first.time_s
        total[1] += final.requests - first.requests
        total[2] += final.failures - first.failures
        total[3] += final.mean_ms * final.requests - first.mean_ms * first.requests
        last[users] = final
    return [
        Level(
            users=users,
            seconds=int(seconds),
            rps=requests / seconds,
            fail_rps=failures / seconds,
            mean_ms=time_sum / requests,
            p50_ms=last[users].p50_ms if current_percentiles else None,
            p95_ms=last[users].p95_ms if current_percentiles else None,
        )
        for users, (seconds, requests, failures, time_sum) in sorted(totals.items())
    ]


def windowed_rps(samples: list[Sample], window: int = 3) -> list[float]:
    """Requests/s over the last `window` samples, from the running totals (a distributed run's master receives
    its workers' numbers every few seconds, so single seconds jump)."""
    rates = []
    for i, sample in enumerate(samples):
        earlier = samples[max(0, i - window)]
        elapsed = sample.time_s - earlier.time_s
        rates.append((sample.requests - earlier.requests) / elapsed if elapsed > 0 else 0.0)
    return rates


def plot(samples: list[Sample], points: list[Level], png_path: Path, title: str = "") -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    users = [p.users for p in points]
    figure = Figure(figsize=(8, 11), layout="constrained")
    ax_rps, ax_latency, ax_time = figure.subplots(3, 1)
    figure.suptitle(title or "Throughput and latency against users")

    peak = max(points, key=lambda p: p.rps)
    ax_rps.plot(users, [p.rps for p in points], "o-", label="requests/s")
    ax_rps.plot([peak.users], [peak.rps], "*", markersize=14, label=f"peak {peak.rps:.1f}/s at {peak.users} users")
    ax_rps.plot(users, [p.fail_rps for p in points], "x--", color="tab:red", label="failures/s")
    ax_rps.set_ylabel("requests/s")
    ax_rps.set_ylim(0, peak.rps * 1.3)  # room for the legend
    ax_latency.plot(users, [p.mean_ms for p in points], "o-", label="mean")
    for name, values in (("p50", [p.p50_ms for p in points]), ("p95", [p.p95_ms for p in points])):
        if all(v is not None for v in values):
            ax_latency.plot(users, values, "o-", label=f"{name} (last ~10 s at each count)")
    ax_latency.set_ylabel("response time (ms)")
    ax_latency.set_ylim(bottom=0)
    for axis in (ax_rps, ax_latency):
        if len(users) > 1 and users[-1] >= 4 * users[0]:
            axis.set_xscale("log", base=2)
        axis.set_xticks(users, [str(u) for u in users])
        axis.set_xlabel("users")
        axis.grid(True, alpha=0.3)
        axis.legend(loc="upper left")

    start = samples[0].time_s
    seconds = [s.time_s - start for s in samples]
    ax_time.plot(seconds, windowed_rps(samples), label="requests/s (3 s window)")
    ax_time.set_xlabel("seconds since start")
    ax_time.set_ylabel("requests/s")
    ax_time.set_ylim(bottom=0)
    ax_time.grid(True, alpha=0.3)
    ax_users = ax_time.twinx()
    ax_users.step(seconds, [s.users for s in samples], where="post", color="tab:gray", label="users")
    ax_users.set_ylabel("users")
    ax_users.set_ylim(bottom=0)
    ax_time.legend(loc="upper left")
    ax_users.legend(loc="upper right")

    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=100)


def write_report(history_csv: Path, png_path: Path, title: str = "") -> list[Level]:
    """Read the history, plot it to png_path, and return the levels."""
    samples, current = read_history(history_csv)
    points = levels(samples, current)
    if not points:
        raise ReportError(f"{history_csv}: no user count held traffic for 2 seconds or more: nothing to plot")
    plot(samples, points, png_path, title)
    return points


def format_levels(points: list[Level]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    lines = [f"{'users':>6} {'seconds':>8} {'req/s':>8} {'fail/s':>7} {'mean ms':>8} {'p50 ms':>7} {'p95 ms':>7}"]
    lines += [
        f"{p.users:>6} {p.seconds:>8} {p.rps:>8.1f} {p.fail_rps:>7.2f} {p.mean_ms:>8.1f} {ms(p.p50_ms):>7} "
        f"{ms(p.p95_ms):>7}"
        for p in points
    ]
    peak = max(points, key=lambda p: p.rps)
    lines.append(f"peak throughput: {peak.rps:.1f} requests/s at {peak.users} users")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("history_csv", type=Path, help=f"PREFIX{HISTORY_SUFFIX} written by locust --csv PREFIX")
    parser.add_argument("-o", "--output", type=Path, help=f"PNG to write (default: PREFIX{PLOT_SUFFIX})")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)
    output = args.output or plot_path_for(str(args.history_csv).removesuffix(HISTORY_SUFFIX))
    try:
        points = write_report(args.history_csv, output, args.title)
    except (ReportError, OSError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 1
    print(format_levels(points))
    print(f"plot: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
