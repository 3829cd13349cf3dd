"""What the MetaDD term costs in each distiller's step, at the demo's shapes, against its floor.

    python benchmarks/metadd_cost.py [--device cpu|cuda] [--methods dm dc sre2l] [--reps 5]

The demo's setting: digits 16x16 (1 channel, 10 classes), IPC 10 (B = 100 synthetic
images), 64 real images per class per step, K = 4 MetaDD networks (the demo's ConvNet,
ConvNetD1, AlexNet, LeNet). Each method's ``step()`` is timed without the term, with
the term in memory="keep" and with the default memory="stream"; the term's cost is the
difference. The floor is one forward with grad and one backward to the images of each
of the K networks on the synthetic batch (benchmarks/workloads_metadd.py's "floor").
"stream_bf16" is the default term under ``precision="bf16"`` (docs/precision.md), its cost
taken against the same fp32 floor; "floor_bf16" is the floor under bf16 autocast.
Timings are round-robin medians (measure.time_cpu, or CUDA events on the GPU); the rows
(op "metadd_cost", with the device) are appended to benchmarks/results/results.csv.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import measure  # noqa: E402
from run import RESULTS, append_rows, run_meta  # noqa: E402
from workloads_metadd import floor  # noqa: E402

import metadd_fast as mf  # noqa: E402
from metadd_fast.data import load_digits  # noqa: E402
from metadd_fast.distill import DISTILLERS  # noqa: E402
from metadd_fast.models import ConvNet, get_model  # noqa: E402

METADD_MODELS = ("ConvNet", "ConvNetD1", "AlexNet", "LeNet")  # the CLI default (cli.DEFAULT_METADD_MODELS)
# name -> (MetaDDLoss memory, precision); None: no term
VARIANTS = {"without": None, "keep": ("keep", "fp32"), "stream": ("stream", "fp32"), "stream_bf16": ("stream", "bf16")}


def distiller(method: str, real, term, models, device: str):
    kw = dict(batch_real=64, seed=0, device=device)
    if term is not None:
        memory, precision = term
        kw.update(metadd=mf.MetaDDLoss(models, memory=memory, precision=precision), metadd_weight=10.0)
    if method == "sre2l":
        torch.manual_seed(0)
        kw["teacher"] = ConvNet(real.channel, real.num_classes, norm="batchnorm", im_size=real.im_size)
    return DISTILLERS[method](real, 10, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", nargs="+", choices=list(DISTILLERS), default=list(DISTILLERS))
    ap.add_argument("--reps", type=int, default=5, help="timed steps per variant on the CPU (default 5)")
    args = ap.parse_args()
    real = load_digits("train", 16)
    torch.manual_seed(0)
    models = [get_model(n, real.channel, real.num_classes, real.im_size).to(args.device).eval().requires_grad_(False)
              for n in METADD_MODELS]
    images = real.images[:100].to(args.device).requires_grad_()
    labels = real.labels[:100].to(args.device)

    def floor_grad(precision: str):
        with mf.precision.autocast(precision, images.device.type):
            return torch.autograd.grad(floor(models, images, labels), images)

    calls = {"floor": measure.Call(lambda: floor_grad("fp32")), "floor_bf16": measure.Call(lambda: floor_grad("bf16"))}
    for method in args.methods:
        for name, term in VARIANTS.items():
            calls[f"{method}/{name}"] = measure.Call(distiller(method, real, term, models, args.device).step)
    if args.device == "cuda":
        times = measure.time_cuda(calls, reps=args.reps)
    else:
        times = measure.time_cpu(calls, warmup=1, reps=args.reps, budget_s=600.0)
    base = times["floor"][0]
    meta = run_meta(args.device)
    append_rows(RESULTS, [dict(op="metadd_cost", provider=name, mode="step", workload="digits16_ipc10_k4",
                               metric="time", unit="ms", p50=f"{t[0] * 1e3:.1f}", p20=f"{t[1] * 1e3:.1f}",
                               p80=f"{t[2] * 1e3:.1f}", **meta) for name, t in times.items()])
    print(f"device: {meta['device']}; digits 16x16, IPC 10 (B=100), K=4 "
          f"({', '.join(METADD_MODELS)}); floor {base * 1e3:.1f} ms, bf16 floor {times['floor_bf16'][0] * 1e3:.1f} ms")
    print(f"{'method':8} {'step, no term':>14} {'term':12} {'step':>10} {'term cost':>10} {'x floor':>8}")
    for method in args.methods:
        without = times[f"{method}/without"][0]
        print(f"{method:8} {without * 1e3:11.1f} ms")
        for name in VARIANTS:
            if name == "without":
                continue
            step = times[f"{method}/{name}"][0]
            print(f"{'':8} {'':14} {name:12} {step * 1e3:7.1f} ms {(step - without) * 1e3:7.1f} ms "
                  f"{(step - without) / base:8.2f}")


if __name__ == "__main__":
    main()
