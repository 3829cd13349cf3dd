"""Whether channels_last pays for MetaDDLoss's frozen networks: each network's floor (one forward
with grad and one backward to the images, benchmarks/workloads_metadd.py's "floor") in fp32 and
under bf16 autocast, with contiguous (NCHW) and channels_last images and weights, timed
round-robin in one process.

    python benchmarks/channels_last.py [--device cpu|cuda] [--reps 3] [--out CSV]

Rows (op "channels_last", provider fp32|fp32_cl|bf16|bf16_cl, workload NET_B_SIZE, metric time
and speedup over the same precision's NCHW) are appended to benchmarks/results/results.csv.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import measure  # noqa: E402
from run import RESULTS, append_rows, run_meta  # noqa: E402

from metadd_fast.models import get_model  # noqa: E402

# (network, B, image size, classes): the two K=4 mixes' networks at 32x32 and the ImageNet-form mix at 64x64
CASES = [(n, 100, 32, 10) for n in ("ConvNet", "ResNet18", "VGG11", "AlexNet", "ConvNetD1", "LeNet")]
CASES += [(n, 100, 64, 200) for n in ("ResNet18ImageNet", "MobileNetV2", "ConvNetD4")]
VARIANTS = {"fp32": (None, False), "fp32_cl": (None, True), "bf16": (torch.bfloat16, False),
            "bf16_cl": (torch.bfloat16, True)}


def floor_call(net, images, labels, dtype, channels_last: bool) -> measure.Call:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = copy.deepcopy(net).to(memory_format=fmt)
    x = images.detach().contiguous(memory_format=fmt).requires_grad_()

    def run():
        with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            score = net(x).float().gather(1, labels[:, None]).sum()
        return torch.autograd.grad(score, x)

    return measure.Call(run)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--nets", nargs="+", default=None, help="only these networks")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    meta = run_meta(args.device)
    print(f"device: {meta['device']}")
    print(f"{'workload':26} " + " ".join(f"{v:>9}" for v in VARIANTS) + "   cl/nchw fp32  cl/nchw bf16")
    for name, B, size, classes in CASES:
        if args.nets and name not in args.nets:
            continue
        torch.manual_seed(0)
        net = get_model(name, 3, classes, (size, size)).to(args.device).eval().requires_grad_(False)
        images = torch.randn(B, 3, size, size, device=args.device)
        labels = torch.randint(0, classes, (B,), device=args.device)
        calls = {v: floor_call(net, images, labels, *spec) for v, spec in VARIANTS.items()}
        times = (measure.time_cuda(calls) if args.device == "cuda"
                 else measure.time_cpu(calls, warmup=1, reps=args.reps))
        workload = f"{name}_b{B}_{size}"
        t = {v: times[v][0] for v in VARIANTS}
        print(f"{workload:26} " + " ".join(f"{t[v] * 1e3:9.1f}" for v in VARIANTS)
              + f"   {t['fp32_cl'] / t['fp32']:12.2f}  {t['bf16_cl'] / t['bf16']:12.2f}", flush=True)
        rows = []
        for v, (p50, p20, p80) in times.items():
            base = t[v.replace("_cl", "")]
            rows.append(dict(op="channels_last", provider=v, mode="full", workload=workload, metric="time", unit="ms",
                             p50=f"{p50 * 1e3:.4f}", p20=f"{p20 * 1e3:.4f}", p80=f"{p80 * 1e3:.4f}", **meta))
            rows.append(dict(op="channels_last", provider=v, mode="full", workload=workload, metric="time_vs_nchw",
                             unit="x", p50=f"{p50 / base:.4f}", p20="", p80="", **meta))
        append_rows(args.out, rows)


if __name__ == "__main__":
    main()
