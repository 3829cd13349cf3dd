"""CAM-variance benchmark: eager reference vs torch.compile(reference) vs fused, in one run.

    python benchmarks/run_cam.py [--device cpu|cuda] [--workloads dc_cifar10_ipc50 ...]

The providers are timed round-robin in one child process (the same background
load for each); the peak RSS of each is measured in a child of its own. Then one table is printed and rows are appended to
benchmarks/results/cam_variance.csv:
op, provider, mode, workload, metric, unit, p50, p20, p80, device, torch, triton, commit.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases  # noqa: E402
import measure  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cam_variance.csv")
FIELDS = ["op", "provider", "mode", "workload", "metric", "unit", "p50", "p20", "p80", "device", "torch",
          "triton", "commit"]
MODES = ("forward", "full")


def min_bytes(inputs, mode: str) -> int:
    """Fewest bytes a fused op must move: features read once (+ weights), and dA written once."""
    features, weights, _, _ = inputs
    feat = sum(f.numel() * f.element_size() for f in features)
    weight = sum(w.numel() * w.element_size() for w in weights)
    return feat + weight + (feat if mode == "full" else 0)


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device copy, counting bytes read and written."""
    x = torch.randn(64 * 2**20, device=device)  # 256 MiB
    y = torch.empty_like(x)
    timer = measure.time_cuda if device == "cuda" else measure.time_cpu
    p50, _, _ = timer({"copy": lambda: y.copy_(x)})["copy"]
    return 2 * x.numel() * x.element_size() / p50


def child(workload: str, mode: str, device: str, what: str) -> dict:
    """Times of all providers, interleaved (what="time"), or the peak extra memory of one
    provider (what=<provider>), in this process."""
    inputs = cases.make_inputs(workload, device)
    fns = {p: (lambda p=p: cases.step(p, mode, inputs)) for p in cases.PROVIDERS}
    if what == "time":
        return {"time": (measure.time_cuda if device == "cuda" else measure.time_cpu)(fns),
                "bytes": min_bytes(inputs, mode)}
    return {"memory": (measure.peak_extra_cuda if device == "cuda" else measure.peak_extra_rss)(fns[what])}


def run_child(workload: str, mode: str, device: str, what: str) -> dict:
    cmd = [sys.executable, __file__, "--child", workload, mode, what, "--device", device]
    # For memory only: a fixed mmap threshold keeps glibc from caching freed large
    # blocks, so RSS follows live memory (it also makes every allocation fault, so
    # timings are taken without it).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if what != "time" else None
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workloads", nargs="+", default=None)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--child", nargs=3, metavar=("WORKLOAD", "MODE", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        workload, mode, what = args.child
        print(json.dumps(child(workload, mode, args.device, what)))
        return
    workloads = args.workloads or (list(cases.WORKLOADS) if args.device == "cuda" else ["dc_cifar10_ipc50"])
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    meta = {"device": measure.device_name(args.device), "torch": torch.__version__, "triton": triton_version,
            "commit": measure.git_commit()}
    bandwidth = copy_bandwidth(args.device)
    rows = [dict(op="copy", provider="torch", mode="copy", workload="256MiB", metric="bandwidth", unit="GB/s",
                 p50=f"{bandwidth / 1e9:.2f}", p20="", p80="", **meta)]
    print(f"device: {meta['device']}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'workload':18} {'mode':8} {'provider':8} {'p50 ms':>9} {'vs eager':>9} {'vs compile':>10} "
          f"{'extra MB':>9} {'GB/s':>7} {'of copy':>8}")
    for workload in workloads:
        for mode in MODES:
            timed = run_child(workload, mode, args.device, "time")
            times = timed["time"]
            for p in cases.PROVIDERS:
                memory = run_child(workload, mode, args.device, p)["memory"]
                p50, p20, p80 = times[p]
                row = dict(op="cam_variance", provider=p, mode=mode, workload=workload, **meta)
                rows.append(dict(row, metric="time", unit="ms", p50=f"{p50 * 1e3:.4f}", p20=f"{p20 * 1e3:.4f}",
                                 p80=f"{p80 * 1e3:.4f}"))
                rows.append(dict(row, metric="peak_extra_memory", unit="MB", p50=f"{memory / 1e6:.2f}",
                                 p20="", p80=""))
                vs_eager = times["eager"][0] / p50
                vs_compile = times["compile"][0] / p50
                rows.append(dict(row, metric="speedup_vs_eager", unit="x", p50=f"{vs_eager:.3f}", p20="", p80=""))
                rows.append(dict(row, metric="speedup_vs_compile", unit="x", p50=f"{vs_compile:.3f}", p20="",
                                 p80=""))
                gbs = timed["bytes"] / p50
                if p == "fused":
                    rows.append(dict(row, metric="achieved_bandwidth", unit="GB/s", p50=f"{gbs / 1e9:.2f}", p20="",
                                     p80=""))
                    rows.append(dict(row, metric="copy_bandwidth_fraction", unit="1", p50=f"{gbs / bandwidth:.3f}",
                                     p20="", p80=""))
                print(f"{workload:18} {mode:8} {p:8} {p50 * 1e3:9.2f} {vs_eager:9.2f} {vs_compile:10.2f} "
                      f"{memory / 1e6:9.1f} {gbs / 1e9:7.2f} {gbs / bandwidth:8.1%}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    new = not os.path.exists(args.out)
    with open(args.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"appended {len(rows)} rows to {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
