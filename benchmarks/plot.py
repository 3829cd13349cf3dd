"""Plot the benchmark CSV: one PNG per op and device: time per provider (p50, p20-p80 bars)
and peak extra memory per provider, for each workload and mode.

    python benchmarks/plot.py [benchmarks/results/results.csv]

Uses each op's latest run; writes <op>_<device>.png beside the CSV (<stem>_<op>_<device>.png
for a CSV other than results.csv, so a quick run never replaces the plots of record).
"""
from __future__ import annotations

import csv
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def plot(path: str) -> list[str]:
    with open(path) as f:
        all_rows = [r for r in csv.DictReader(f) if r["op"] != "copy"]
    written = []
    for op, device in sorted({(r["op"], r["device"]) for r in all_rows}):
        rows_d = [r for r in all_rows if r["op"] == op and r["device"] == device]
        latest = rows_d[-1]["commit"]
        rows_d = [r for r in rows_d if r["commit"] == latest]
        groups = list(dict.fromkeys((r["workload"], r["mode"]) for r in rows_d))
        providers = list(dict.fromkeys(r["provider"] for r in rows_d))
        fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 2.0 + 1.4 * len(groups)), 7.0))  # time above memory
        width = 0.8 / len(providers)
        for ax, metric, label in ((axes[0], "time", "time per call, ms (p50, p20-p80)"),
                                  (axes[1], "peak_extra_memory", "peak extra memory, MB")):
            for i, p in enumerate(providers):
                xs, ys, lo, hi = [], [], [], []
                for j, g in enumerate(groups):
                    r = next((r for r in reversed(rows_d) if (r["workload"], r["mode"]) == g  # latest run
                              and r["provider"] == p and r["metric"] == metric), None)
                    if r:
                        xs.append(j + i * width)
                        ys.append(float(r["p50"]))
                        lo.append(float(r["p50"]) - float(r["p20"]) if r["p20"] else 0.0)
                        hi.append(float(r["p80"]) - float(r["p50"]) if r["p80"] else 0.0)
                bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=p)
                ax.bar_label(bars, fmt="%.1f", fontsize=6)
            ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(groups))])
            ax.set_xticklabels([f"{w}\n{m}" for w, m in groups], fontsize=7)
            ax.set_yscale("log" if metric == "time" else "symlog")
            ax.set_ylabel(label, fontsize=8)
        axes[0].set_title(f"{op} on {device} (commit {latest})", fontsize=9, loc="left")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        stem = os.path.splitext(os.path.basename(path))[0]
        name = ("" if stem == "results" else f"{stem}_") + f"{op}_" + re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_")
        name += ".png"
        out = os.path.join(os.path.dirname(path), name)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


if __name__ == "__main__":
    paths = sys.argv[1:] or [os.path.join(HERE, "results", "results.csv")]
    for p in paths:
        for out in plot(p):
            print("wrote", os.path.relpath(out))
