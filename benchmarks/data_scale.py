"""Real data at ImageNet scale: how fast image folders decode (``--parts decode``), what
the chunked engine costs at 100 vs 1,000 classes (``--parts engine``), and that zoo-network
training and ``--zca`` stream (``--parts stream``).

    python benchmarks/data_scale.py                          # 10 classes x 50 JPEGs of 500 x 375, 64 and 224 px
    python benchmarks/data_scale.py --per-class 100 --sizes 64,128,224 --workers 2
    python benchmarks/data_scale.py --parts engine           # 100 and 1,000 classes x 10 JPEGs, 32 px
    python benchmarks/data_scale.py --parts stream           # 20 classes x 100, 200, 400 JPEGs, 32 px

engine: ImageNet-layout folders of ``--scales`` (default 100 and 1,000 classes x 10 JPEGs of
500 x 375; ``--unique`` distinct generated files, hard-linked into every class folder), and
two chunked runs on each (``--classes-per-chunk`` 20, IPC 1, ``--engine-size`` 32 px,
``--iterations`` per chunk, networks from state_dict files of random weights): ``sre2l+metadd`` (ConvNetBN teacher,
MetaDD over ConvNetD3 and ConvNetD4; decodes no image) and ``dm+robust`` (DM through
ConvNetD2 with robust DD, alpha 0.5: every class is decoded, grouped and dropped). Each run
is a fresh process (``--engine-reps`` of them): seconds to the imports, the index, the first
image update and the end; peak RSS at the first update and at the end. Rows go to
benchmarks/results/data_scale_engine.csv; the summary prints the 1,000-over-100 ratios.

stream: folders of ``--stream-scales`` (default 20 classes x 100, 200 and 400 images, hard
links to ``--unique`` generated JPEGs) and two chunked runs on each, each a fresh process
(the engine part's child), decoded at ``--stream-size`` (32 px), 1 thread, IPC 1, one step
per chunk of 2 classes: ``sre2l+zoo-teacher`` (the teacher ConvNetBN without a weights
file, trained on the folder for ``--pretrain-epochs`` (1) before the recovery, which reads
no image) and ``dm+zca`` (DM through ConvNet in ZCA space: the ZCA fitted on every image).
Both read every image of the folder, so a run that held the data set would grow with it;
peak RSS should stay flat (only the index grows). ``--baseline DIR``: the same runs with
the ``metadd_fast`` package of DIR too (an export of an earlier commit), labelled by DIR's
name. Rows go to benchmarks/results/data_scale_stream.csv (``dataset_f32_MB``: what the
whole folder takes as one float32 tensor, for scale).

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
import json
import os
import shutil
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


# ---- engine: time to the first step and peak RSS at 100 vs 1,000 classes -------------------

ENGINE_OUT = os.path.join(HERE, "results", "data_scale_engine.csv")
ENGINE_FIELDS = ["cpu", "cpus", "commit", "date", "run", "networks", "classes", "per_class", "images", "image", "size",
                 "ipc", "iterations", "classes_per_chunk", "threads", "import_s", "index_s", "first_step_s", "total_s",
                 "rss_first_step_MB", "peak_rss_MB", "loadavg_before", "loadavg_after"]

# One chunked run in its own process (peak RSS is per process): argv = folder, out, config (JSON),
# size, threads. Prints one JSON line: seconds from the start to the imports, the index and the
# first image update (every distiller's finish_step), the total, and the peak RSS then and at the end.
ENGINE_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import torch
from metadd_fast import engine
from metadd_fast.sources import ImageFolderSource
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
torch.set_num_threads(int(sys.argv[5]))
t_import = time.perf_counter() - t0
first = []
for cls in set(engine.DISTILLERS.values()):
    def finish(self, real=cls.finish_step):
        if not first:
            first.append((time.perf_counter() - t0, rss()))
        return real(self)
    cls.finish_step = finish
source = ImageFolderSource(sys.argv[1], int(sys.argv[4]), index_dir=sys.argv[2])
t_index = time.perf_counter() - t0 - t_import
engine.run_chunked(engine.EngineConfig(**json.loads(sys.argv[3])), source, sys.argv[2], progress=False)
print(json.dumps(dict(import_s=t_import, index_s=t_index, first_step_s=first[0][0], total_s=time.perf_counter() - t0,
                      rss_first_step_MB=first[0][1], peak_rss_MB=rss())))
"""

ENGINE_RUNS = ("sre2l+metadd", "dm+robust")


def linked_folder(root: str, unique: str, classes: int, per_class: int) -> str:
    """An ImageNet-layout ``<root>/train`` of ``classes`` x ``per_class`` files, hard links to the
    JPEGs of the folder ``unique`` (generating 20,000 distinct photo-like JPEGs takes longer than
    decoding them; the decoder sees the same bytes either way). Returns the train folder."""
    from metadd_fast.testing_data import wnid

    files = sorted(os.path.join(dp, f) for dp, _, names in os.walk(unique) for f in names)
    train = os.path.join(root, "train")
    for c in range(classes):
        os.makedirs(os.path.join(train, wnid(c)))
        for i in range(per_class):
            src = files[(c * per_class + i) % len(files)]
            os.link(src, os.path.join(train, wnid(c), f"{wnid(c)}_{i}.JPEG"))
    return train


def engine_config(run: str, folder: str, classes: int, size: int, ipc: int, iterations: int, per_chunk: int,
                  batch_real: int) -> dict:
    """The run's EngineConfig fields; its networks are state_dict files of random weights for
    ``classes`` classes written into ``folder`` (as a user's checkpoints: no zoo training)."""
    import torch

    from metadd_fast.models import get_model

    def weights(arch):
        path = os.path.join(folder, f"{arch}_{classes}.pt")
        if not os.path.exists(path):
            torch.manual_seed(0)
            torch.save(get_model(arch, 3, classes, (size, size)).state_dict(), path)
        return f"{arch}={path}"

    common = dict(ipc=ipc, iterations=iterations, classes_per_chunk=per_chunk, batch_real=batch_real)
    if run == "sre2l+metadd":  # networks whose heads stay small at 1,000 classes (as ResNet-18's 512 x 1,000)
        return dict(common, method="sre2l", teacher=weights("ConvNetBN"), metadd_weight=1.0,
                    metadd_models=(weights("ConvNetD3"), weights("ConvNetD4")))
    return dict(common, method="dm", arch="ConvNetD2", robust_alpha=0.5)


def engine_rows(args, tmp: str) -> list:
    """For each scale (classes x images per class) and run, ``--engine-reps`` fresh processes."""
    import subprocess

    from metadd_fast.testing_data import make_imagenet_folder

    unique = os.path.join(tmp, "unique")
    t0 = time.perf_counter()
    make_imagenet_folder(unique, 1, args.unique, size=args.image, seed=0)
    print(f"generated {args.unique} distinct JPEGs of {args.image[0]}x{args.image[1]} in "
          f"{time.perf_counter() - t0:.1f} s (linked into every folder)")
    base = {"cpu": _cpu_model(), "cpus": _cpus(), "commit": measure.git_commit(), "date": time.strftime("%Y-%m-%d"),
            "image": f"{args.image[0]}x{args.image[1]}", "size": args.engine_size, "ipc": 1,
            "iterations": args.iterations, "classes_per_chunk": args.classes_per_chunk, "threads": args.threads}
    rows = []
    for classes, per_class in args.scales:
        root = os.path.join(tmp, f"{classes}x{per_class}")
        train = linked_folder(root, unique, classes, per_class)
        for run in args.runs.split(","):
            cfg = engine_config(run, root, classes, args.engine_size, 1, args.iterations, args.classes_per_chunk,
                                per_class)
            for rep in range(args.engine_reps):
                out = os.path.join(root, f"{run}_{rep}")
                load_before = os.getloadavg()[0]
                done = subprocess.run([sys.executable, "-c", ENGINE_CHILD, train, out, json.dumps(cfg),
                                       str(args.engine_size), str(args.threads)], capture_output=True, text=True,
                                      env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
                if done.returncode:
                    raise SystemExit(f"data_scale.py: {run} at {classes} classes failed:\n{done.stderr[-2000:]}")
                m = json.loads(done.stdout.strip().splitlines()[-1])
                nets = [spec.partition("=")[0] for spec in (cfg.get("teacher"), *cfg.get("metadd_models", ())) if spec]
                row = dict(base, run=run, networks=" ".join(nets or [cfg["arch"]]), classes=classes,
                           per_class=per_class, images=classes * per_class,
                           loadavg_before=f"{load_before:.2f}", loadavg_after=f"{os.getloadavg()[0]:.2f}",
                           **{k: f"{v:.2f}" if k.endswith("_s") else f"{v:.0f}" for k, v in m.items()})
                rows.append(row)
                append_rows(args.engine_out, ENGINE_FIELDS, [row])  # each row as it comes: a long run keeps them
                print(f"{run:13s} {classes:5d} classes x {per_class:4d}: first step {m['first_step_s']:6.1f} s "
                      f"(index {m['index_s']:.1f} s), total {m['total_s']:6.1f} s, peak RSS {m['peak_rss_MB']:.0f} MB "
                      f"(at the first step {m['rss_first_step_MB']:.0f} MB)", flush=True)
                shutil.rmtree(out)
    return rows


# ---- stream: zoo networks and --zca on 1x, 2x, 4x the images per class ---------------------------

STREAM_OUT = os.path.join(HERE, "results", "data_scale_stream.csv")
STREAM_FIELDS = ["cpu", "cpus", "commit", "code", "date", "run", "classes", "per_class", "images", "image", "size",
                 "ipc", "iterations", "classes_per_chunk", "pretrain_epochs", "threads", "dataset_f32_MB",
                 "total_s", "peak_rss_MB", "loadavg_before", "loadavg_after"]
STREAM_RUNS = ("sre2l+zoo-teacher", "dm+zca")


def stream_config(run: str, pretrain_epochs: int) -> dict:
    """The EngineConfig fields of a stream run: networks without weights files, or --zca."""
    common = dict(ipc=1, iterations=1, classes_per_chunk=2, batch_real=32)
    if run == "sre2l+zoo-teacher":
        return dict(common, method="sre2l", teacher="ConvNetBN", pretrain_epochs=pretrain_epochs)
    return dict(common, method="dm", zca=True)


def stream_rows(args, tmp: str) -> list:
    """For each scale, run and code (this checkout, and ``--baseline``), one fresh process."""
    import subprocess

    unique = os.path.join(tmp, "unique")
    make_imagenet_folder(unique, 1, args.unique, size=args.image, seed=0)
    codes = [(measure.git_commit(), os.path.dirname(HERE))]
    if args.baseline:
        codes.append((os.path.basename(os.path.normpath(args.baseline)), args.baseline))
    base = {"cpu": _cpu_model(), "cpus": _cpus(), "commit": measure.git_commit(), "date": time.strftime("%Y-%m-%d"),
            "image": f"{args.image[0]}x{args.image[1]}", "size": args.stream_size, "ipc": 1, "iterations": 1,
            "classes_per_chunk": 2, "threads": args.threads}
    rows = []
    for classes, per_class in args.stream_scales:
        root = os.path.join(tmp, f"{classes}x{per_class}")
        train = linked_folder(root, unique, classes, per_class)
        for run in args.runs_stream.split(","):
            cfg = stream_config(run, args.pretrain_epochs)
            for code, path in codes:
                out = os.path.join(root, f"{run}_{code}")
                load_before = os.getloadavg()[0]
                done = subprocess.run([sys.executable, "-c", ENGINE_CHILD, train, out, json.dumps(cfg),
                                       str(args.stream_size), str(args.threads)], capture_output=True, text=True,
                                      env=dict(os.environ, PYTHONPATH=path), cwd=path)
                if done.returncode:
                    raise SystemExit(f"data_scale.py: {run} ({code}) at {classes}x{per_class} failed:\n"
                                     f"{done.stderr[-2000:]}")
                m = json.loads(done.stdout.strip().splitlines()[-1])
                images = classes * per_class
                row = dict(base, code=code, run=run, classes=classes, per_class=per_class, images=images,
                           pretrain_epochs=cfg.get("pretrain_epochs", ""),
                           dataset_f32_MB=f"{images * 3 * args.stream_size ** 2 * 4 / 2 ** 20:.0f}",
                           total_s=f"{m['total_s']:.1f}", peak_rss_MB=f"{m['peak_rss_MB']:.0f}",
                           loadavg_before=f"{load_before:.2f}", loadavg_after=f"{os.getloadavg()[0]:.2f}")
                rows.append(row)
                append_rows(args.stream_out, STREAM_FIELDS, [row])
                print(f"{run:18s} {code:14s} {classes} classes x {per_class:4d}: peak RSS {m['peak_rss_MB']:5.0f} MB "
                      f"(the images as float32: {row['dataset_f32_MB']} MB), {m['total_s']:6.1f} s", flush=True)
                shutil.rmtree(out)
    return rows


def stream_part(args, root) -> None:
    """The stream part (``root`` unused: it makes its own folders at ``--stream-scales``)."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = stream_rows(args, tmp)
    print(f"appended {len(rows)} rows to {args.stream_out}")


def engine_summary(rows: list) -> None:
    """Peak RSS and time to the first step at the largest scale over the smallest, per run (medians)."""
    for run in ENGINE_RUNS:
        by = {}
        for r in rows:
            if r["run"] == run:
                by.setdefault(int(r["classes"]), []).append(r)
        if len(by) < 2:
            continue
        lo, hi = by[min(by)], by[max(by)]
        med = lambda rs, k: float(np.median([float(r[k]) for r in rs]))  # noqa: E731
        after = lambda rs: float(np.median([float(r["first_step_s"]) - float(r["import_s"]) for r in rs]))  # noqa
        rss = med(hi, "peak_rss_MB") / med(lo, "peak_rss_MB")
        print(f"{run}: {max(by)} vs {min(by)} classes: peak RSS x{rss:.3f}, "
              f"first step after the imports {after(lo):.1f} -> {after(hi):.1f} s "
              f"(index {med(lo, 'index_s'):.1f} -> {med(hi, 'index_s'):.1f} s)")


def engine_part(args, root) -> None:
    """The engine part (``root`` unused: it makes its own folders at ``--scales``)."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = engine_rows(args, tmp)
    engine_summary(rows)
    print(f"appended {len(rows)} rows to {args.engine_out}")


def decode_part(args, root: str) -> None:
    rows = decode_rows(args, root)
    append_rows(args.decode_out, DECODE_FIELDS, rows)
    print(f"appended {len(rows)} rows to {args.decode_out}")


PARTS = {"decode": decode_part, "engine": engine_part, "stream": stream_part}  # name -> part(args, root): each writes its own rows


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
    p.add_argument("--scales", default="100x10,1000x10",
                   help="engine: CLASSESxIMAGES_PER_CLASS folders, comma-separated (equal images per class)")
    p.add_argument("--unique", type=int, default=200, help="engine: distinct JPEGs generated (then hard-linked)")
    p.add_argument("--engine-size", type=int, default=32, help="engine: decode size (px)")
    p.add_argument("--iterations", type=int, default=1, help="engine: steps per chunk")
    p.add_argument("--classes-per-chunk", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="engine: torch threads per run")
    p.add_argument("--engine-reps", type=int, default=2, help="engine: processes per scale and run")
    p.add_argument("--runs", default=",".join(ENGINE_RUNS), help="engine: runs, comma-separated")
    p.add_argument("--engine-out", default=ENGINE_OUT)
    p.add_argument("--stream-scales", default="20x100,20x200,20x400",
                   help="stream: CLASSESxIMAGES_PER_CLASS folders, comma-separated")
    p.add_argument("--stream-size", type=int, default=32, help="stream: decode size (px)")
    p.add_argument("--pretrain-epochs", type=int, default=1, help="stream: epochs of the zoo teacher's training")
    p.add_argument("--runs-stream", default=",".join(STREAM_RUNS), help="stream: runs, comma-separated")
    p.add_argument("--baseline", default=None,
                   help="stream: a folder holding an earlier metadd_fast package, run the same way for comparison")
    p.add_argument("--stream-out", default=STREAM_OUT)
    args = p.parse_args(argv)
    args.scales = [tuple(int(v) for v in x.lower().split("x")) for x in args.scales.split(",")]
    args.stream_scales = [tuple(int(v) for v in x.lower().split("x")) for x in args.stream_scales.split(",")]
    args.image = tuple(int(v) for v in args.image.lower().split("x"))
    args.sizes = [int(v) for v in args.sizes.split(",")]
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown part(s) {', '.join(unknown)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None and "decode" in parts:
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
