"""Real data at ImageNet scale: how fast image folders decode (``--parts decode``).

    python benchmarks/data_scale.py                          # 10 classes x 50 JPEGs of 500 x 375, 64 and 224 px
    python benchmarks/data_scale.py --per-class 100 --sizes 64,128,224 --workers 2

decode: an ImageNet-layout folder of generated photo-like JPEGs (500 x 375, as ImageNet's
typical image; :func:`metadd_fast.testing_data.make_imagenet_folder`) is decoded to
``size`` x ``size`` three ways, on the same files, timed round-robin in one run (every
method sees the same background load; the files are read once before, so all decode
from the page cache):

- ``plain``: one image at a time, PIL's open, convert("RGB"), resize(BILINEAR): the
  earlier ``data.load_image_folder``'s per-image work (without its float32 copy);
- ``draft_1_thread``: :class:`metadd_fast.sources.ImageFolderSource` on one thread: JPEG
  DCT-domain downscaling (``Image.draft``) before the same resize, into uint8 class tensors;
- ``parallel``: the same source with ``--workers`` decode threads (default: the CPUs this
  process may use).

Rows are appended to benchmarks/results/data_decode.csv: images/s at the median and the
80th-percentile (slower) round; the speedup over ``plain`` at the median; images per
CPU-second of all threads; ``cpus_busy``, the process's CPU time over the wall time of one
more round (a ``parallel`` row well under its thread count got fewer CPUs than threads, so
its speedup is the host's, not the decode's: on a shared host check it and the load
average, also recorded); the CPU model and count; Pillow's and libjpeg-turbo's versions.
The index column times listing the folder (names, sizes, mtimes) in files per second, to
extrapolate to ImageNet-1K's 1,281,167 train files.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import measure  # noqa: E402

from metadd_fast.sources import ImageFolderSource  # noqa: E402
from metadd_fast.testing_data import make_imagenet_folder  # noqa: E402

DECODE_OUT = os.path.join(HERE, "results", "data_decode.csv")
DECODE_FIELDS = ["cpu", "cpus", "pillow", "libjpeg_turbo", "commit", "date", "image", "images", "size", "method",
                 "workers", "images_per_s_p50", "images_per_s_p80", "speedup_vs_plain_p50", "images_per_cpu_s",
                 "cpus_busy",
                 "index_files_per_s",
                 "loadavg_before", "loadavg_after"]


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "cpu"


def append_rows(path: str, fields: list, rows: list) -> None:
    """Add ``rows`` to the CSV at ``path`` (atomically); older rows keep their values under the
    current header (fields they lack stay blank)."""
    old = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        w.writeheader()
        w.writerows(old + rows)
    os.replace(path + ".tmp", path)


def plain_decode(paths: list, size: int) -> list:
    """One image at a time: open, convert("RGB"), resize(BILINEAR), as uint8 arrays."""
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)))
    return out


def decode_rows(args, root: str) -> list:
    import PIL
    from PIL import features

    train = os.path.join(root, "train")
    t0 = time.perf_counter()
    listing = ImageFolderSource(train, 8, workers=args.workers, mean=(0.5,) * 3, std=(0.5,) * 3)
    index_rate = len(listing) / (time.perf_counter() - t0)
    paths = [p for c in range(listing.num_classes) for p in listing.paths(c)]
    for p in paths:  # into the page cache: every method decodes from memory
        with open(p, "rb") as f:
            f.read()
    base = {"cpu": _cpu_model(), "cpus": _cpus(), "pillow": PIL.__version__,
            "libjpeg_turbo": features.version("libjpeg_turbo") or "", "commit": measure.git_commit(),
            "date": time.strftime("%Y-%m-%d"), "image": f"{args.image[0]}x{args.image[1]}", "images": len(paths),
            "index_files_per_s": f"{index_rate:.0f}"}
    rows = []
    for size in args.sizes:
        one = ImageFolderSource(train, size, workers=1, mean=(0.5,) * 3, std=(0.5,) * 3)
        many = ImageFolderSource(train, size, workers=args.workers, mean=(0.5,) * 3, std=(0.5,) * 3)
        calls = {
            "plain": measure.Call(lambda: plain_decode(paths, size)),
            "draft_1_thread": measure.Call(lambda: [one.class_pixels(c) for c in range(one.num_classes)]),
            "parallel": measure.Call(lambda: [many.class_pixels(c) for c in range(many.num_classes)]),
        }
        load_before = os.getloadavg()[0]
        times = measure.time_cpu(calls, warmup=1, reps=args.reps, budget_s=args.budget)
        load_after = os.getloadavg()[0]
        cpu, busy = {}, {}
        for method, call in calls.items():  # process CPU time (every thread's) of one more round
            c0, w0 = time.process_time(), time.perf_counter()
            call.run()
            cpu[method] = time.process_time() - c0
            busy[method] = cpu[method] / (time.perf_counter() - w0)
        plain_p50 = times["plain"][0]
        for method, (p50, _p20, p80) in times.items():
            workers = {"plain": 1, "draft_1_thread": 1, "parallel": many.workers}[method]
            rows.append(dict(base, size=size, method=method, workers=workers,
                             images_per_s_p50=f"{len(paths) / p50:.0f}", images_per_s_p80=f"{len(paths) / p80:.0f}",
                             speedup_vs_plain_p50=f"{plain_p50 / p50:.2f}",
                             images_per_cpu_s=f"{len(paths) / max(cpu[method], 1e-9):.0f}",
                             cpus_busy=f"{busy[method]:.2f}",
                             loadavg_before=f"{load_before:.2f}",
                             loadavg_after=f"{load_after:.2f}"))
            print(f"{size:4d} px  {method:15s} {workers} thread(s)  {len(paths) / p50:7.0f} images/s "
                  f"(x{plain_p50 / p50:.2f} plain), {len(paths) / max(cpu[method], 1e-9):5.0f} per CPU-second, "
                  f"{busy[method]:.2f} CPUs busy  "
                  f"load {load_before:.1f} -> {load_after:.1f}")
        many.close()
    return rows


def decode_part(args, root: str) -> None:
    rows = decode_rows(args, root)
    append_rows(args.decode_out, DECODE_FIELDS, rows)
    print(f"appended {len(rows)} rows to {args.decode_out}")


PARTS = {"decode": decode_part}  # name -> part(args, root): each writes its own rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="decode", help=f"comma-separated parts to run: {', '.join(PARTS)}")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--image", default="500x375", help="generated JPEG size, WIDTHxHEIGHT")
    p.add_argument("--root", default=None, help="an existing ImageNet-layout folder (with train/) instead")
    p.add_argument("--sizes", default="64,224", help="decode: sizes (px), comma-separated")
    p.add_argument("--workers", type=int, default=None, help="decode: threads (default: the usable CPUs)")
    p.add_argument("--reps", type=int, default=7, 
                   help="decode: timed rounds (each decodes every image once per method)")
    p.add_argument("--budget", type=float, default=120.0, help="decode: seconds of timed rounds per size, at most")
    p.add_argument("--decode-out", default=DECODE_OUT, help="decode: the CSV its rows are appended to")
    args = p.parse_args(argv)
    args.image = tuple(int(v) for v in args.image.lower().split("x"))
    args.sizes = [int(v) for v in args.sizes.split(",")]
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown part(s) {', '.join(unknown)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = os.path.join(tmp, "imagenet")
            t0 = time.perf_counter()
            make_imagenet_folder(root, args.classes, args.per_class, size=args.image, seed=0)
            print(f"generated {args.classes * args.per_class} JPEGs of {args.image[0]}x{args.image[1]} "
                  f"in {time.perf_counter() - t0:.1f} s")
        for name in parts:
            PARTS[name](args, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
