"""Benchmark runner: eager reference vs torch.compile(reference) vs fused, side by side in one run.

    python benchmarks/run.py [--device cpu|cuda] [--ops cam_variance cvar ...] [--workloads NAME ...]

For each op, workload and mode (forward; backward, of a graph built before the timing;
full = forward + backward), the
providers (eager, compile, fused, and any the op adds) are timed round-robin in one
child process, so they see the same background load; their peak extra memory is
measured one after another in a second child, where freed memory goes back to the
system at once, so each provider's peak is its own.
A table is printed and rows are appended to benchmarks/results/results.csv (with --quick,
benchmarks/results/quick.csv): op, provider, mode, workload, metric, unit, p50, p20, p80,
device, torch, triton, commit; then the PNG plots of that CSV (benchmarks/plot.py) are written
beside it.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import measure  # noqa: E402
from providers import MODES, PROVIDERS, timed_call  # noqa: E402

MODULES = ("workloads_cam", "workloads_cvar", "workloads_nearest", "workloads_metadd")
RESULTS = os.path.join(HERE, "results", "results.csv")
QUICK_RESULTS = os.path.join(HERE, "results", "quick.csv")
FIELDS = ["op", "provider", "mode", "workload", "metric", "unit", "p50", "p20", "p80", "device", "torch",
          "triton", "commit"]


def op_modules() -> dict:
    """op name -> its workloads module."""
    out = {}
    for name in MODULES:
        mod = importlib.import_module(name)
        out.update({op: mod for op in mod.OPS})
    return out


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device copy, counting bytes read and written."""
    x = torch.randn(64 * 2**20, device=device)  # 256 MiB
    y = torch.empty_like(x)
    timer = measure.time_cuda if device == "cuda" else measure.time_cpu
    p50, _, _ = timer({"copy": measure.Call(lambda: y.copy_(x))})["copy"]
    return 2 * x.numel() * x.element_size() / p50


def child(op: str, workload: str, device: str, what: str) -> dict:
    """For each mode of the op: the times of all providers, interleaved (what="time"), or the
    peak extra memory of each provider, one after another (what="memory"), in this process.
    One process runs all modes, so torch.compile traces the loss once for backward and full."""
    mod = op_modules()[op]
    inputs = mod.make_inputs(workload, device)
    providers = getattr(mod, "PROVIDERS", PROVIDERS)
    timing = dict(getattr(mod, "TIMING", {})) if device != "cuda" else {}
    if "METADD_BENCH_REPS" in os.environ:  # --quick
        timing["reps"] = min(timing.get("reps", 40), int(os.environ["METADD_BENCH_REPS"]))
    out = {}
    for mode in getattr(mod, "MODES", MODES):
        calls = {p: timed_call(mod, op, p, mode, inputs) for p in providers}
        if what == "time":
            out[mode] = {"time": (measure.time_cuda(calls) if device == "cuda" else measure.time_cpu(calls, **timing)),
                         "bytes": mod.min_bytes(inputs, mode)}
        elif device == "cuda":
            out[mode] = {p: measure.peak_extra_cuda(call) for p, call in calls.items()}
        else:
            out[mode] = {p: measure.peak_extra_rss(call, calls=getattr(mod, "MEMORY_CALLS", 5))
                         for p, call in calls.items()}
    return out


def run_child(op: str, workload: str, device: str, what: str) -> dict:
    cmd = [sys.executable, __file__, "--child", op, workload, what, "--device", device]
    # For memory only: a fixed mmap threshold keeps glibc from caching freed large
    # blocks, so RSS follows live memory (it also makes every allocation fault, so
    # timings are taken without it).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if what == "memory" else None
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def append_rows(path: str, rows: list) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


def run_meta(device: str) -> dict:
    """The device, versions and commit that every result row carries."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"device": measure.device_name(device), "torch": torch.__version__, "triton": triton_version,
            "commit": measure.git_commit()}


def case_rows(op: str, workload: str, device: str, bandwidth: float, meta: dict) -> list:
    """Measure one (op, workload) in each mode for every provider; print its lines; return its CSV rows."""
    mod = op_modules()[op]
    timed_modes = run_child(op, workload, device, "time")
    memory_modes = run_child(op, workload, device, "memory")
    rows = []
    cases = [(mode, p) for mode in timed_modes for p in getattr(mod, "PROVIDERS", PROVIDERS)]
    for mode, p in cases:
        times, memory = timed_modes[mode]["time"], memory_modes[mode][p]
        p50, p20, p80 = times[p]
        vs_eager = times["eager"][0] / p50
        vs_compile = times["compile"][0] / p50 if "compile" in times else float("nan")
        gbs = timed_modes[mode]["bytes"] / p50
        row = dict(op=op, provider=p, mode=mode, workload=workload, **meta)
        metrics = [("time", "ms", p50 * 1e3, p20 * 1e3, p80 * 1e3),
                   ("peak_extra_memory", "MB", memory / 1e6, None, None),
                   ("speedup_vs_eager", "x", vs_eager, None, None)]
        if "compile" in times:
            metrics.append(("speedup_vs_compile", "x", vs_compile, None, None))
        if p != "eager":
            metrics += [("achieved_bandwidth", "GB/s", gbs / 1e9, None, None),
                        ("copy_bandwidth_fraction", "1", gbs / bandwidth, None, None)]
        for metric, unit, v50, v20, v80 in metrics:
            rows.append(dict(row, metric=metric, unit=unit, p50=f"{v50:.4f}",
                             p20="" if v20 is None else f"{v20:.4f}", p80="" if v80 is None else f"{v80:.4f}"))
        print(f"{op:16} {workload:24} {mode:8} {p:8} {p50 * 1e3:9.2f} {vs_eager:9.2f} {vs_compile:10.2f} "
              f"{memory / 1e6:9.1f} {gbs / 1e9:7.2f} {gbs / bandwidth:8.1%}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ops", nargs="+", default=None, help="ops to run (default: all)")
    ap.add_argument("--workloads", nargs="+", default=None, help="workload names (default: the device's set)")
    ap.add_argument("--quick", action="store_true",
                    help="one workload per op, fewer repetitions, no MetaDDLoss step unless named in --ops")
    ap.add_argument("--out", default=None, help="CSV to append to (default: results/results.csv, "
                                                "with --quick results/quick.csv)")
    ap.add_argument("--child", nargs=3, metavar=("OP", "WORKLOAD", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        op, workload, what = args.child
        print(json.dumps(child(op, workload, args.device, what)))
        return
    args.out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    mods = op_modules()
    ops = args.ops or [op for op in mods if not (args.quick and op == "metadd_loss")]
    if args.quick:
        os.environ["METADD_BENCH_REPS"] = "10"
    meta = run_meta(args.device)
    bandwidth = copy_bandwidth(args.device)
    append_rows(args.out, [dict(op="copy", provider="torch", mode="copy", workload="256MiB", metric="bandwidth",
                                unit="GB/s", p50=f"{bandwidth / 1e9:.2f}", p20="", p80="", **meta)])
    print(f"device: {meta['device']}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'op':16} {'workload':24} {'mode':8} {'provider':8} {'p50 ms':>9} {'vs eager':>9} {'vs compile':>10} "
          f"{'extra MB':>9} {'GB/s':>7} {'of copy':>8}")
    count = 1
    for op in ops:
        mod = mods[op]
        default = list(mod.WORKLOADS) if args.device == "cuda" else mod.CPU_WORKLOADS
        chosen = [w for w in (args.workloads or default) if w in mod.WORKLOADS]
        for workload in chosen[:1] if args.quick else chosen:
            rows = case_rows(op, workload, args.device, bandwidth, meta)
            append_rows(args.out, rows)  # each finished case is on disk before the next starts
            count += len(rows)
    print(f"appended {count} rows to {os.path.relpath(args.out)}")
    from plot import plot

    for png in plot(args.out):
        print("wrote", os.path.relpath(png))


if __name__ == "__main__":
    main()
