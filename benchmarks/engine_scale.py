"""Scale test of the large-IPC engine without ImageNet: ImageNet-shaped random data.

    python benchmarks/engine_scale.py [--device cuda] [--size 64] [--ipc 50] [--classes-run 4]

1,000 classes of random images (``--size`` x ``--size``, ``--per-class`` real images per
class, a class-dependent mean) go through the full chunked pipeline (memory-mapped
synthetic set, class chunks, per-chunk checkpoints) with the zoo's ResNet-18.
``--classes-run`` of the 1,000 classes are distilled for ``--iterations`` steps after a
one-class warm-up; from the time per class-iteration the script projects the wall time
of IPC ``--ipc`` over all 1,000 classes for ``--target-iterations`` steps on 1 and 8
devices (class shards are independent, so the projection divides by the device
count). Rows (images/s, peak memory, projections) are appended to
benchmarks/results/engine_scale.csv with the device name. The zoo's ResNet-18 is DC's
CIFAR form (stride-1 stem): at 224x224 it costs about 15x a torchvision ResNet-18, so
use 64x64 on a CPU.
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import measure  # noqa: E402

from metadd_fast.engine import EngineConfig, RandomImageSource, run_chunked  # noqa: E402

OUT = os.path.join(HERE, "results", "engine_scale.csv")
FIELDS = ["device", "torch", "commit", "arch", "size", "ipc", "classes_run", "iterations", "batch_real",
          "robust_alpha", "seconds", "synthetic_images_per_s", "peak_memory_MB", "memory_kind",
          "target_iterations", "projected_hours_1_device", "projected_hours_8_devices"]


class ImageNetShaped(RandomImageSource):
    """The first ``run`` classes of a 1,000-class ImageNet-shaped source."""

    def __init__(self, run: int, per_class: int, size: int):
        super().__init__(1000, per_class, (3, size, size), seed=0)
        self.num_classes = run
        self.key += f":first{run}"


def _peak_memory(device: str) -> tuple:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e6, "device allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, "host peak RSS (process)"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=64, help="image size (64 or 224)")
    ap.add_argument("--ipc", type=int, default=50)
    ap.add_argument("--classes-run", type=int, default=4, help="classes distilled and timed (of 1,000)")
    ap.add_argument("--classes-per-chunk", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=2, help="steps timed per class")
    ap.add_argument("--target-iterations", type=int, default=1000, help="steps of the projected full run")
    ap.add_argument("--per-class", type=int, default=64, help="real images per class")
    ap.add_argument("--batch-real", type=int, default=32)
    ap.add_argument("--arch", default="ResNet18")
    ap.add_argument("--robust-alpha", type=float, default=None)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    common = dict(ipc=args.ipc, batch_real=args.batch_real, arch=args.arch, robust_alpha=args.robust_alpha,
                  device=args.device, pin_memory=args.device.startswith("cuda"))
    with tempfile.TemporaryDirectory() as tmp:
        run_chunked(EngineConfig(iterations=1, classes_per_chunk=1, **common), ImageNetShaped(1, args.per_class,
                    args.size), os.path.join(tmp, "warmup"), progress=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        cfg = EngineConfig(iterations=args.iterations, classes_per_chunk=args.classes_per_chunk, **common)
        start = time.perf_counter()
        run_chunked(cfg, ImageNetShaped(args.classes_run, args.per_class, args.size), os.path.join(tmp, "run"))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak, kind = _peak_memory(args.device)
    per_class_step = seconds / (args.classes_run * args.iterations)
    full_hours = per_class_step * 1000 * args.target_iterations / 3600
    row = dict(device=measure.device_name(args.device.split(":")[0]), torch=torch.__version__,
               commit=measure.git_commit(), arch=args.arch, size=args.size, ipc=args.ipc,
               classes_run=args.classes_run, iterations=args.iterations, batch_real=args.batch_real,
               robust_alpha=args.robust_alpha if args.robust_alpha is not None else "",
               seconds=f"{seconds:.2f}",
               synthetic_images_per_s=f"{args.classes_run * args.ipc * args.iterations / seconds:.1f}",
               peak_memory_MB=f"{peak:.0f}", memory_kind=kind, target_iterations=args.target_iterations,
               projected_hours_1_device=f"{full_hours:.1f}", projected_hours_8_devices=f"{full_hours / 8:.1f}")
    new = not os.path.exists(args.out)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)
    for k in FIELDS:
        print(f"{k:28} {row[k]}")


if __name__ == "__main__":
    main()
