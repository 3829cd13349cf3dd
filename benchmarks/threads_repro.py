"""What the thread count does to a distillation's result: the same run at --threads 1 and 2.

    python benchmarks/threads_repro.py [--iterations 3] [--size 16] [--out DIR]

Runs ``metadd-fast distill`` (the chunked engine, digits, IPC 2, 5 classes per chunk) for DM,
DC and SRe2L, each in a plain process at --threads 1 and --threads 2 (one process, the run's
own intra-op threads), and writes the largest pixel difference between the two synthetic sets
(0 where bit-identical) to benchmarks/results/threads_repro.csv, with the CPU in every row.
Ranks vs one process at equal threads are bit-identical (tests/test_engine.py, tests/test_faults.py).
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu() -> str:
    with open("/proc/cpuinfo") as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown")


def _run(method: str, threads: int, args, out: str) -> torch.Tensor:
    cmd = [sys.executable, "-m", "metadd_fast.cli", "distill", "--method", method, "--ipc", "2", "--iterations",
           str(args.iterations), "--batch-real", "32", "--size", str(args.size), "--classes-per-chunk", "5",
           "--threads", str(threads), "--out", out]
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return torch.load(os.path.join(out, "synthetic.pt"), weights_only=True)["data"][0][0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "threads_repro.csv"))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("dm", "dc", "sre2l"):
            one, two = (_run(method, t, args, os.path.join(tmp, f"{method}{t}")) for t in (1, 2))
            diff = float((one.double() - two.double()).abs().max())
            rows.append({"method": method, "iterations": args.iterations, "size": args.size, "ipc": 2,
                         "threads_a": 1, "threads_b": 2, "max_abs_pixel_diff": f"{diff:.3g}",
                         "bit_identical": torch.equal(one, two), "cpu": _cpu(), "torch": torch.__version__})
            print(rows[-1], flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
