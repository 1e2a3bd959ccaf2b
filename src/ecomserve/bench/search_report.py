"""The report of `ecomserve bench --workload search`: `search_results.json`, `search.csv`, the recall/QPS plot
and `search_summary.md`."""

from __future__ import annotations

import json
from pathlib import Path

from ecomserve.bench.catalogs import EMBED_MAX, NOISE_SIGMA, K
from ecomserve.bench.report import plt, write_csv


def plot_recall_qps(results: dict, path: Path) -> None:
    rows = results["rows"]
    scales = list(dict.fromkeys(r["scale"] for r in rows))
    figure, axes = plt.subplots(1, len(scales), figsize=(5.5 * len(scales), 4.5), squeeze=False)
    markers = {"faiss flat": "s", "milvus lite": "D"}
    for axis, scale in zip(axes[0], scales):
        here = [r for r in rows if r["scale"] == scale]
        hnsw = [r for r in here if r["ef_search"] is not None]
        if hnsw:  # the efSearch sweep is one trade-off curve: joined, each point labelled with its ef
            axis.plot([r["qps"] for r in hnsw], [r["recall_at_10"] for r in hnsw], color="grey", linewidth=0.8)
        for r in here:
            axis.scatter(r["qps"], r["recall_at_10"], marker=markers.get(r["config"], "o"), label=r["config"])
        vectors = here[0]["vectors"]
        axis.set(xlabel=f"queries / s ({results['concurrency']} threads)", ylabel=f"recall@{K}", xscale="log")
        axis.set_title(f"{scale:,} items ({vectors} vectors)", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def search_markdown(results: dict) -> str:
    lines = [
        f"Catalog search: top-{K}, {results['concurrency']} threads × one query each, {results['duration_s']:g} s "
        f"per point, {results['queries']} embedded shipped queries; recall against exact search on the same vectors.",
        "",
        "| items | vectors | config | build s | RSS growth MB | disk MB | QPS | p50 ms | p95 ms | recall@10 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['scale']:,} | {r['vectors']} | {r['config']} | {_number(r['build_s'])} | "
            f"{_number(r['rss_growth_mb'])} | {_number(r['disk_mb'])} | {_number(r['qps'], 0)} | "
            f"{_number(r['p50_ms'], 2)} | {_number(r['p95_ms'], 2)} | {_number(r['recall_at_10'], 4)} |"
        )
    if any(s["vectors"] == "synthetic" for s in results["scales"]):
        lines += ["", f"synthetic: the first {EMBED_MAX:,} embedded vectors plus copies with gaussian noise "]
        lines[-1] += f"(σ = {NOISE_SIGMA} per component), re-normalised."
    lines += ["", "milvus lite: RSS growth is the Milvus Lite server's; faiss: this process's."]
    return "\n".join(lines) + "\n"


def write_search_report(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "search_results.json").write_text(json.dumps(results, indent=2))
    write_csv(out_dir / "search.csv", results["rows"])
    plot_recall_qps(results, out_dir / "search_recall_qps.png")
    # Beside summary.md, not inside it: the default workload rewrites summary.md on every run.
    (out_dir / "search_summary.md").write_text(search_markdown(results))
