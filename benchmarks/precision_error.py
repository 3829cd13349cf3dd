"""The MetaDD term's error under mixed precision: the image gradient and the term's value of
MetaDDLoss(precision="bf16"/"fp16") against precision="fp32", with fp32 against float64 for scale.

    python benchmarks/precision_error.py [--seeds 5] [--batch 32] [--trained-epochs 2] [--out CSV]

For each K=4 mix of benchmarks/workloads_metadd.py (zoo, skewed at 32x32; ImageNet-form at
64x64) and each seed: fresh random-initialized networks and random images (B images, random
labels); and, with --trained-epochs > 0, the zoo and skewed networks trained that many epochs
on digits upscaled to 32x32 (1 channel) with digits images. Metrics: cosine similarity of the
image gradient with fp32's, ||g - g_fp32|| / ||g_fp32||, and the relative change of the term's
value. Rows (op "precision_error") are appended to benchmarks/results/precision_error.csv; a Markdown
table of median, min and max over seeds is printed (docs/precision.md quotes it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from run import RESULTS, append_rows, run_meta  # noqa: E402
from workloads_metadd import IMAGENET_FORM, SKEWED, ZOO  # noqa: E402

import metadd_fast as mf  # noqa: E402
from metadd_fast.data import load_digits  # noqa: E402
from metadd_fast.models import get_model  # noqa: E402
from metadd_fast.training import train_model  # noqa: E402

MIXES = {"zoo": (ZOO, 32, 10), "skewed": (SKEWED, 32, 10), "imagenet_form": (IMAGENET_FORM, 64, 200)}
COMPARED = (("bf16", "fp32"), ("fp16", "fp32"), ("fp32", "fp64"))


def term(models, x, y, precision: str):
    """(value, image gradient) of the MetaDD term (memory="keep": no chunking in the comparison)."""
    x = x.clone().requires_grad_()
    loss = mf.MetaDDLoss(models, memory="keep", precision=precision)(x, y)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach().double(), g.double()


def compare(models, x, y) -> dict:
    """{(precision, against): (cosine, relative norm error, relative value change)}."""
    runs = {p: term(models, x, y, p) for p in ("fp32", "bf16", "fp16")}
    runs["fp64"] = term([m.double() for m in models], x.double(), y, "fp32")
    for m in models:
        m.float()
    out = {}
    for p, ref in COMPARED:
        (v, g), (v0, g0) = runs[p], runs[ref]
        out[(p, ref)] = (float(torch.nn.functional.cosine_similarity(g.flatten(), g0.flatten(), 0)),
                         float((g - g0).norm() / g0.norm()), float((v - v0).abs() / v0.abs()))
    return out


def cases(args):
    """(mix label, networks, images, labels) for every mix, seed and training state."""
    digits = load_digits("train", 32) if args.trained_epochs else None
    for mix, (names, size, classes) in MIXES.items():
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            models = [get_model(n, 3, classes, (size, size)).eval() for n in names]
            g = torch.Generator().manual_seed(1000 + seed)
            yield (f"{mix}_random_init", models, torch.randn(args.batch, 3, size, size, generator=g),
                   torch.randint(0, classes, (args.batch,), generator=g))
            if digits is None or mix == "imagenet_form":
                continue
            torch.manual_seed(seed)
            models = [train_model(get_model(n, 1, 10, (32, 32)), digits.images, digits.labels,
                                  epochs=args.trained_epochs, seed=seed) for n in names]
            idx = torch.randperm(len(digits.labels), generator=g)[:args.batch]
            yield f"{mix}_trained{args.trained_epochs}ep_digits", models, digits.images[idx], digits.labels[idx]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--trained-epochs", type=int, default=2, help="0: random-initialized networks only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(RESULTS), "precision_error.csv"))
    args = ap.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)  # fp16 on a CPU without fast fp16: measured all the same
    meta = run_meta("cpu")
    print(f"device: {meta['device']}")
    results: dict = {}
    for label, models, x, y in cases(args):
        for (p, ref), values in compare(models, x, y).items():
            results.setdefault((label, p, ref), []).append(values)
            rows = [dict(op="precision_error", provider=f"{p}_vs_{ref}", mode="full", workload=f"{label}_b{args.batch}",
                         metric=metric, unit="1", p50=f"{v:.6f}", p20="", p80="", **meta)
                    for metric, v in zip(("grad_cosine", "grad_rel_err", "value_rel_change"), values)]
            append_rows(args.out, rows)
        print(f"done {label}", flush=True)
    print(f"\n| networks (B={args.batch}, {args.seeds} seeds) | precision | cosine (median, min) | "
          f"rel. grad error (median, max) | rel. value change (median, max) |\n|---|---|---|---|---|")
    for (label, p, ref), vals in results.items():
        cos, err, dv = zip(*vals)
        print(f"| {label} | {p} vs {ref} | {statistics.median(cos):.4f}, {min(cos):.4f} | "
              f"{statistics.median(err):.3g}, {max(err):.3g} | {statistics.median(dv):.2g}, {max(dv):.2g} |")


if __name__ == "__main__":
    main()
