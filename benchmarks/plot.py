"""Plot the benchmark CSV: one PNG per op and device, time per provider (p50, p20-p80 bars).

    python benchmarks/plot.py [benchmarks/results/results.csv]

Uses each op's latest commit rows; writes <op>_<device>.png beside the CSV.
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
        rows = [r for r in csv.DictReader(f) if r["metric"] == "time" and r["op"] != "copy"]
    written = []
    for op, device in sorted({(r["op"], r["device"]) for r in rows}):
        rows_d = [r for r in rows if r["op"] == op and r["device"] == device]
        latest = rows_d[-1]["commit"]
        rows_d = [r for r in rows_d if r["commit"] == latest]
        groups = list(dict.fromkeys((r["workload"], r["mode"]) for r in rows_d))
        providers = list(dict.fromkeys(r["provider"] for r in rows_d))
        fig, ax = plt.subplots(figsize=(2.2 + 2.0 * len(groups), 3.6))
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            xs, ys, lo, hi = [], [], [], []
            for j, g in enumerate(groups):
                r = next((r for r in rows_d if (r["workload"], r["mode"]) == g and r["provider"] == p), None)
                if r:
                    xs.append(j + i * width)
                    ys.append(float(r["p50"]))
                    lo.append(float(r["p50"]) - float(r["p20"]))
                    hi.append(float(r["p80"]) - float(r["p50"]))
            bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=p)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(groups))])
        ax.set_xticklabels([f"{w}\n{m}" for w, m in groups], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("time per call, ms (p50, p20-p80)")
        ax.set_title(f"{op} on {device}\n(commit {latest})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"{op}_" + re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_") + ".png"
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
