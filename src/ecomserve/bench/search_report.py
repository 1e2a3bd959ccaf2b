"""The report of `ecomserve bench --workload search`: `search_results.json`, `search.csv`, the recall/QPS plot
(unfiltered dense rows above; filtered, BM25 and hybrid rows below) and `search_summary.md`."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.ticker import NullFormatter

from ecomserve.bench.catalogs import EMBED_MAX, NOISE_SIGMA, K
from ecomserve.bench.report import plt, write_csv
from ecomserve.index.faiss_index import EXACT_FILTERED_BELOW


def _unfiltered_dense(row: dict) -> bool:
    return row["mode"] == "dense" and row["filter"] is None


def _label(row: dict) -> str:
    return row["config"] + (f", filter {row['filter_target']}" if row["filter"] is not None else "")


def _plot_sweep(axis, rows: list[dict], xlabel: str) -> None:
    """Recall against QPS of the unfiltered dense configs; the efSearch sweep joined as one trade-off curve."""
    markers = {"faiss flat": "s", "milvus lite": "D"}
    hnsw = [r for r in rows if r["ef_search"] is not None]
    if hnsw:
        axis.plot([r["qps"] for r in hnsw], [r["recall_at_10"] for r in hnsw], color="grey", linewidth=0.8)
    for r in rows:
        axis.scatter(r["qps"], r["recall_at_10"], marker=markers.get(r["config"], "o"), label=r["config"])
    axis.set(xlabel=xlabel, ylabel=f"recall@{K}", xscale="log")
    axis.xaxis.set_minor_formatter(NullFormatter())  # a span under a decade labels every minor tick, overlapping
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)


def _plot_bars(axis, rows: list[dict], xlabel: str) -> None:
    """QPS per filtered, BM25 and hybrid point, each bar annotated with its recall (dense) or its mode."""
    colours = {"dense": "tab:blue", "lexical": "tab:orange", "hybrid": "tab:green"}
    labels = [_label(r) for r in rows]
    axis.barh(labels, [r["qps"] for r in rows], color=[colours[r["mode"]] for r in rows])
    for position, r in enumerate(rows):
        note = r["mode"] if r["recall_at_10"] is None else f"recall {r['recall_at_10']:.3f}"
        axis.annotate(note, (r["qps"], position), xytext=(3, 0), textcoords="offset points", va="center", fontsize=6)
    axis.invert_yaxis()  # the rows' order, top down
    axis.set(xlabel=xlabel, xscale="log")
    axis.tick_params(axis="y", labelsize=6)
    axis.grid(alpha=0.3, axis="x")


def plot_recall_qps(results: dict, path: Path) -> None:
    rows = results["rows"]
    scales = list(dict.fromkeys(r["scale"] for r in rows))
    bars = max(len([r for r in rows if r["scale"] == s and not _unfiltered_dense(r)]) for s in scales)
    figure, axes = plt.subplots(
        2,
        len(scales),
        figsize=(6 * len(scales), 4.5 + 0.22 * bars),
        squeeze=False,
        gridspec_kw={"height_ratios": [4.5, 0.22 * bars + 0.5]},
    )
    xlabel = f"queries / s ({results['concurrency']} threads)"
    for column, scale in enumerate(scales):
        here = [r for r in rows if r["scale"] == scale]
        sweep, others = [r for r in here if _unfiltered_dense(r)], [r for r in here if not _unfiltered_dense(r)]
        _plot_sweep(axes[0][column], sweep, xlabel)
        axes[0][column].set_title(f"{scale:,} items ({here[0]['vectors']} vectors), unfiltered", fontsize=10)
        if others:
            _plot_bars(axes[1][column], others, xlabel)
        else:
            axes[1][column].set_axis_off()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def _filter_cell(row: dict) -> str:
    if row["filter"] is None:
        return "–"
    return f"{row['filter_target']} ({100 * row['filter_share']:.2f} %)"


def _answer_check(results: dict) -> str:
    """Whether every checked answer had min(K, matching) items, all matching its filter."""
    checked = [r for r in results["rows"] if r["short_results"] is not None]
    failed = [r for r in checked if r["short_results"] or r["filter_violations"]]
    if not failed:
        return f"Every answer of the {len(checked)} checked dense points had min({K}, matching) items, all matching."
    named = ", ".join(
        f"{r['scale']:,} {_label(r)} ({r['short_results']} short, {r['filter_violations']} not matching)"
        for r in failed
    )
    return f"Answers with other than min({K}, matching) items or items not matching: {named}."


def search_markdown(results: dict) -> str:
    lines = [
        f"Catalog search: top-{K}, {results['concurrency']} threads × one query each, {results['duration_s']:g} s "
        f"per point, {results['queries']} shipped queries (dense: their vectors, precomputed; BM25: their text); "
        "recall against exact search on the same vectors (filtered: among the matching items only).",
        "",
        "| items | vectors | mode | config | filter (share) | build s | RSS growth MB | disk MB | QPS | p50 ms | "
        "p95 ms | recall@10 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['scale']:,} | {r['vectors']} | {r['mode']} | {r['config']} | {_filter_cell(r)} | "
            f"{_number(r['build_s'])} | {_number(r['rss_growth_mb'])} | {_number(r['disk_mb'])} | "
            f"{_number(r['qps'], 0)} | {_number(r['p50_ms'], 2)} | {_number(r['p95_ms'], 2)} | "
            f"{_number(r['recall_at_10'], 4)} |"
        )
    filters = "; ".join(f"{label}: `{json.dumps(where)}`" for label, where in results["filters"].items())
    lines += ["", f"Filters: {filters}. {_answer_check(results)}"]
    lines += [
        f"faiss HNSW answers a filter matching at most {EXACT_FILTERED_BELOW:,} items exactly over their vectors, "
        "larger ones by a graph walk skipping the others. The hybrid point fuses BM25 and the faiss index the spec "
        "serves at that scale; hybrid and bm25 rows measure the index calls, the query's embedding excluded."
    ]
    if any(s["vectors"] == "synthetic" for s in results["scales"]):
        lines += ["", f"synthetic: the first {EMBED_MAX:,} embedded vectors plus copies with gaussian noise "]
        lines[-1] += f"(σ = {NOISE_SIGMA} per component), re-normalised; each copy takes its row's title and brand."
    lines += ["", "milvus lite: RSS growth is the Milvus Lite server's; faiss and bm25: this process's."]
    return "\n".join(lines) + "\n"


def write_search_report(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "search_results.json").write_text(json.dumps(results, indent=2))
    write_csv(out_dir / "search.csv", results["rows"])
    plot_recall_qps(results, out_dir / "search_recall_qps.png")
    # Beside summary.md, not inside it: the default workload rewrites summary.md on every run.
    (out_dir / "search_summary.md").write_text(search_markdown(results))
