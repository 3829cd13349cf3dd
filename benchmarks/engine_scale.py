"""Scale test of the large-IPC engine without ImageNet: ImageNet-shaped random data.

    python benchmarks/engine_scale.py                      # CPU row: SRe2L + MetaDD (K=3) at 64x64
    python benchmarks/engine_scale.py --device cuda --size 224 --library torchvision   # GPU row
    python benchmarks/engine_scale.py --method dm --arch ResNet18   # the engine's first (DM) rows

1,000 classes of random images (``--size`` x ``--size``, ``--per-class`` real images per
class, a class-dependent mean) go through the full chunked pipeline (memory-mapped
synthetic set, class chunks, per-chunk checkpoints). The default is SRe2L's recovery
(``--method sre2l``) from a ResNet-18 teacher with the MetaDD term over K=3 networks,
each read from a state_dict file as a user's checkpoint would be (random weights, 1,000
outputs: the timing does not depend on the values):

- ``--library zoo`` (default): our ImageNet-form ResNet18ImageNet (teacher and MetaDD),
  MobileNetV2 and ConvNetD4, which run on the CPU torch;
- ``--library torchvision``: torchvision's resnet18 (teacher and MetaDD), mobilenet_v2 and
  efficientnet_b0, built with weights=None and saved to a file first (nothing is
  downloaded); needs torchvision, which does not import with the CPU torch here.

``--classes-run`` of the 1,000 classes are distilled for ``--iterations`` steps after a
one-class, one-step warm-up (first-call compilation); the time is the engine's own, from
its first chunk to the saved result, without loading the networks. From the time per
class-step the script projects the wall time of IPC ``--ipc`` over all 1,000 classes for
``--target-iterations`` steps on 1 and 8 workers (GPUs, or CPU hosts like this one):
classes are independent (SRe2L, DM; with robust DD over ``--cvar-chunks`` 1), so the
projection divides by the worker count. Rows (images/s, peak memory, projections) are
appended to benchmarks/results/engine_scale.csv with the device name; older rows of the
file keep their values under the current header.
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import measure  # noqa: E402

from metadd_fast.engine import EngineConfig, run_chunked  # noqa: E402
from metadd_fast.models import get_model  # noqa: E402
from metadd_fast.sources import RandomSource  # noqa: E402

OUT = os.path.join(HERE, "results", "engine_scale.csv")
FIELDS = ["device", "torch", "commit", "method", "arch", "teacher", "metadd_models", "metadd_weight", "size", "ipc",
          "classes_run", "iterations", "batch_real", "robust_alpha", "seconds", "synthetic_images_per_s",
          "peak_memory_MB", "memory_kind", "target_iterations", "projected_hours_1_device",
          "projected_hours_8_devices"]
NETWORKS = {  # library -> (teacher, MetaDD networks)
    "zoo": ("ResNet18ImageNet", ("ResNet18ImageNet", "MobileNetV2", "ConvNetD4")),
    "torchvision": ("resnet18", ("resnet18", "mobilenet_v2", "efficientnet_b0")),
}
CLASSES = 1000


class ImageNetShaped(RandomSource):
    """The first ``run`` classes of a 1,000-class ImageNet-shaped source (networks have 1,000 outputs)."""

    num_outputs = CLASSES

    def __init__(self, run: int, per_class: int, size: int):
        super().__init__(CLASSES, per_class, (3, size, size), seed=0)
        self.num_classes, self.counts = run, self.counts[:run]
        self.key += f":first{run}"


def _weights_file(folder: str, library: str, arch: str, size: int) -> str:
    """A state_dict file of ``arch`` with random weights and 1,000 outputs; returns its spec."""
    path = os.path.join(folder, f"{arch}.pt")
    if not os.path.exists(path):
        if library == "zoo":
            net = get_model(arch, 3, CLASSES, (size, size))
        else:
            try:
                import torchvision.models
            except Exception as err:  # ImportError, or a torchvision built for another torch
                raise SystemExit(f"engine_scale.py: --library torchvision: torchvision does not import here "
                                 f"({type(err).__name__}: {err})") from None
            net = torchvision.models.get_model(arch, weights=None, num_classes=CLASSES)
        torch.save(net.state_dict(), path)
    return f"{arch}={path}" if library == "zoo" else f"torchvision:{arch}={path}"


def _peak_memory(device: str) -> tuple:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e6, "device allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, "host peak RSS (process)"


def _append(path: str, row: dict) -> None:
    """Add ``row``; rows written under an older header are kept (their missing fields blank,
    method 'dm': the engine's first rows were DM)."""
    rows = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = [dict(r, method=r.get("method") or "dm") for r in csv.DictReader(f)]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, restval="", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows + [row])
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=64, help="image size (64 on a CPU, 224 on a GPU)")
    ap.add_argument("--method", default="sre2l", choices=["sre2l", "dm", "dc"])
    ap.add_argument("--library", default="zoo", choices=sorted(NETWORKS), help="where the networks come from")
    ap.add_argument("--metadd-weight", type=float, default=1.0, help="0: no MetaDD term")
    ap.add_argument("--ipc", type=int, default=50)
    ap.add_argument("--classes-run", type=int, default=2, help="classes distilled and timed (of 1,000)")
    ap.add_argument("--classes-per-chunk", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=3, help="steps timed per class")
    ap.add_argument("--target-iterations", type=int, default=1000, help="steps of the projected full run")
    ap.add_argument("--per-class", type=int, default=64, help="real images per class")
    ap.add_argument("--batch-real", type=int, default=32, help="real images per class per step (dm, dc)")
    ap.add_argument("--arch", default="ConvNetD4", help="the network DM/DC match through")
    ap.add_argument("--robust-alpha", type=float, default=None)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    teacher_arch, metadd_archs = NETWORKS[args.library]
    with tempfile.TemporaryDirectory() as tmp:
        teacher = _weights_file(tmp, args.library, teacher_arch, args.size) if args.method == "sre2l" else None
        metadd = tuple(_weights_file(tmp, args.library, a, args.size) for a in metadd_archs) \
            if args.metadd_weight else ()
        common = dict(method=args.method, ipc=args.ipc, batch_real=args.batch_real, arch=args.arch,
                      robust_alpha=args.robust_alpha, teacher=teacher, metadd_weight=args.metadd_weight,
                      metadd_models=metadd, device=args.device, pin_memory=args.device.startswith("cuda"))
        run_chunked(EngineConfig(iterations=1, classes_per_chunk=1, **common), ImageNetShaped(1, args.per_class,
                    args.size), os.path.join(tmp, "warmup"), progress=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        cfg = EngineConfig(iterations=args.iterations, classes_per_chunk=args.classes_per_chunk, **common)
        run = run_chunked(cfg, ImageNetShaped(args.classes_run, args.per_class, args.size), os.path.join(tmp, "run"))
        seconds = run["seconds"]  # the chunks (the engine synchronizes by saving), not the network loading
    peak, kind = _peak_memory(args.device)
    per_class_step = seconds / (args.classes_run * args.iterations)
    full_hours = per_class_step * CLASSES * args.target_iterations / 3600
    row = dict(device=measure.device_name(args.device.split(":")[0]), torch=torch.__version__,
               commit=measure.git_commit(), method=args.method, arch=args.arch if args.method != "sre2l" else "",
               teacher=f"{args.library}:{teacher_arch}" if teacher else "",
               metadd_models=" ".join(f"{args.library}:{a}" for a in metadd_archs) if metadd else "",
               metadd_weight=args.metadd_weight, size=args.size, ipc=args.ipc,
               classes_run=args.classes_run, iterations=args.iterations, batch_real=args.batch_real,
               robust_alpha=args.robust_alpha if args.robust_alpha is not None else "",
               seconds=f"{seconds:.2f}",
               synthetic_images_per_s=f"{args.classes_run * args.ipc * args.iterations / seconds:.1f}",
               peak_memory_MB=f"{peak:.0f}", memory_kind=kind, target_iterations=args.target_iterations,
               projected_hours_1_device=f"{full_hours:.1f}", projected_hours_8_devices=f"{full_hours / 8:.1f}")
    _append(args.out, row)
    for k in FIELDS:
        print(f"{k:28} {row[k]}")


if __name__ == "__main__":
    main()
