"""Benchmark output: CSV tables, PNG plots and a Markdown summary for the README."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_csv(path: Path, rows: list[dict]) -> None:
    rows = [{k: v for k, v in row.items() if not isinstance(v, list | dict)} for row in rows]
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


# Contenders drawn as a line over client counts (served), and as a level (in-process, one caller).
SERVED_PREFIXES = ("served", "ecomserve served", "infinity")
IN_PROCESS_STYLES = (("pytorch eager", "--"), ("in-process", ":"), ("ecomserve in-process", ":"), ("fastembed", "-."))


def plot_throughput(results: dict, path: Path) -> None:
    rows = results["measurements"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    figure, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for axis, workload in zip(axes[0], workloads):
        served = [r for r in rows if r["workload"] == workload and r["contender"].startswith(SERVED_PREFIXES)]
        for contender, protocol in dict.fromkeys((r["contender"], r["protocol"]) for r in served):
            points = sorted(
                (r["concurrency"], r["throughput_items"])
                for r in served
                if (r["contender"], r["protocol"]) == (contender, protocol)
            )
            marker = "o" if protocol == "grpc" else "s"
            axis.plot(*zip(*points), marker=marker, label=f"{contender} {protocol}")
        for prefix, style in IN_PROCESS_STYLES:
            for r in rows:
                if r["workload"] == workload and r["contender"].startswith(prefix) and r["protocol"] == "in-process":
                    axis.axhline(r["throughput_items"], linestyle=style, color="grey", label=r["contender"])
        axis.set(title=workload, xlabel="concurrent clients", ylabel="texts / s", xscale="log")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_pareto(results: dict, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 5))
    torch_rate = next(
        r["throughput_items"]
        for r in results["measurements"]
        if r["contender"] == "pytorch eager" and r["workload"] == "query embed"
    )
    for v in results["variants"]:
        speedup = v["query_per_s"] / torch_rate
        axis.scatter(speedup, v["ndcg5"], marker="o" if v["servable"] else "x")
        axis.annotate(v["name"], (speedup, v["ndcg5"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.axhline(results["reference_ndcg5"], linestyle="--", color="grey", label="PyTorch fp32")
    axis.axhline(results["reference_ndcg5"] - 0.01, linestyle=":", color="red", label="accuracy bar (-0.01)")
    axis.set(xlabel="in-process speed-up over PyTorch (one query per call)", ylabel="NDCG@5 (eval set)")
    axis.set_title("variants: accuracy vs speed (x = batch-dependent, not servable)", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def peers_markdown(results: dict) -> list[str]:
    """What each peer ran, and its parity to the reference."""
    peers = results.get("peers") or {}
    lines = []
    if "ecomserve_served_parity" in peers:
        served = peers["ecomserve_served_parity"]
        lines += [
            f"ecomserve's served model vs PyTorch fp32 on the same parity texts: min cosine {served['min_cosine']:.4f}",
            "",
        ]
    if "infinity" in peers or "fastembed" in peers:
        lines += ["| peer | engine | how | parity (min cosine, reference) | notes |", "|---|---|---|---|---|"]
    if "infinity" in peers:
        for config, record in peers["infinity"]["engines"].items():
            found = record.get("parity", {})
            parity = f"{found['min_cosine']:.4f} ({found['reference']})" if found else "-"
            notes = [f"model {Path(record['model_file']).name}" if "model_file" in record else "bundled folder"]
            notes.append(f"RSS {record['rss_mb']:.0f} MB" if "rss_mb" in record else "")
            if found and not found["ok"]:
                notes.append("parity below the bar: left out of the ratios")
            if record.get("own_optimization_failed"):
                notes.append("its own graph optimisation failed, ran the file as given")
            if "error" in record:
                notes.append(f"failed: {record['error'][:300]}")
            note = "; ".join(n for n in notes if n)
            lines.append(f"| infinity | {config} | {peers['infinity']['how']} | {parity} | {note} |")
    if "fastembed" in peers:
        found = peers["fastembed"]["parity"]
        exhausted = [k for k, v in peers["fastembed"]["exhausted"].items() if v]
        note = f"texts ran out: {exhausted}" if exhausted else ""
        lines.append(
            f"| fastembed | onnxruntime, {Path(peers['fastembed']['model_file']).name} (served INT8) | "
            f"{peers['fastembed']['how']} | {found['min_cosine']:.4f} ({found['reference']}) | {note} |"
        )
    return [*lines, ""] if lines else []


def format_check(value) -> str:
    """A ratio or score to 3 decimals; a name (the variant the default rule picks) or None as it is."""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(results: dict) -> str:
    lines = []
    if "cpu" in results:  # results.json files from before it was recorded have none
        lines += [f"CPU: {results['cpu']}; load average before {results['load_average_before'][0]:.2f}", ""]
    if results["variants"]:
        lines += [
            "| variant | runtime | layers | size MB | queries/s | titles/s | NDCG@5 | classify | cos min | servable |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for v in results["variants"]:
        lines.append(
            f"| {v['name']} | {v['runtime']} | {v['layers']} | {v['size_mb']:.1f} | {v['query_per_s']:.0f} | "
            f"{v['titles_per_s']:.0f} | {v['ndcg5']:.4f} | {v['classify_accuracy']:.3f} | {v['cosine_min']:.4f} | "
            f"{'yes' if v['servable'] else 'no'} |"
        )
    ndcg = (
        f"PyTorch fp32 NDCG@5: {results['reference_ndcg5']:.4f}, classify {results['reference_classify']:.3f}; "
        if "reference_ndcg5" in results
        else ""
    )
    lines += [
        "",
        f"{ndcg}served variant: {results['served_variant']}; "
        f"server RSS {results.get('server_rss_mb', float('nan')):.0f} MB",
        "",
        *peers_markdown(results),
        "| contender | workload | protocol | clients | texts/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["measurements"]:
        lines.append(
            f"| {r['contender']} | {r['workload']} | {r['protocol']} | {r['concurrency']} | "
            f"{r['throughput_items']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |"
        )
    if results.get("tuning"):
        lines += [
            "",
            "| layout | instances | threads | queue delay µs | texts/s (query embed, gRPC, 16 clients) | p50 ms |",
        ]
        lines += ["|---|---|---|---|---|---|"]
        for t in results["tuning"]:
            delay = t.get("max_queue_delay_us", results["spec"]["serving"]["dynamic_batching"]["max_queue_delay_us"])
            lines.append(
                f"| {t['layout']} | {t['instances']} | {t['intra_op_threads']} | {delay} | "
                f"{t['texts_per_s']:.0f} | {t['p50_ms']:.1f} |"
            )
    lines += ["", "| check | value |", "|---|---|"]
    lines += [f"| {k} | {format_check(v)} |" for k, v in results["checks"].items()]
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "measurements.csv", results["measurements"])
    if results["variants"]:
        write_csv(out_dir / "variants.csv", results["variants"])
    if results.get("tuning"):
        write_csv(out_dir / "tuning.csv", results["tuning"])
    plot_throughput(results, out_dir / "throughput.png")
    if results["variants"]:  # `--workload peers` builds no variants
        plot_pareto(results, out_dir / "pareto.png")
    (out_dir / "summary.md").write_text(markdown(results))
