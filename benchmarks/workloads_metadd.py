"""Benchmark workloads of one MetaDDLoss step, against the term's floor and the naive graph.

Providers (mode "full" = forward + backward to the images):
- "floor": what any MetaDD term must do, one forward with grad and one backward to the
  images of each of the K frozen networks (the backward of its label scores);
- "eager": the naive per-model autograd graph (reference CAMs, every model's graph kept);
- "keep" (fused CAM op, every model's graph kept), "stream" (the default: no budget given),
  "stream_budget" (stream with ``memory_budget=BUDGET_MB``) and "stream_cvar" (the default
  with a CVaR, alpha=0.3).
- mixed precision (MetaDDLoss(precision=...), docs/precision.md): "floor_bf16" (the floor
  under bf16 autocast), "keep_bf16", "stream_bf16"; on CUDA also "floor_fp16", "keep_fp16".
  Their ratios are taken to the fp32 floor.

As a script, it prints each provider's time and peak extra memory with its ratio to the
naive graph's and to the floor's, and appends the rows to benchmarks/results/results.csv:

    python benchmarks/workloads_metadd.py [--device cpu|cuda] [--workloads NAME ...] [--providers NAME ...]

Ratios to "eager" are written only when it is among the providers.

(benchmarks/run.py --ops metadd_loss runs the same cases in the common table.)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import metadd_fast as mf
from metadd_fast.models import get_model

ZOO = ("ConvNet", "ResNet18", "VGG11", "AlexNet")
SKEWED = ("ResNet18", "ConvNetD1", "AlexNet", "LeNet")  # one network holds most of the memory
IMAGENET_FORM = ("ResNet18ImageNet", "MobileNetV2", "ConvNetD4", "AlexNet")  # stride-32 networks at 64x64
TORCHVISION = ("torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v2",
               "torchvision:efficientnet_b0")  # built with weights=None
# name -> (networks, B, image size, channels, classes)
WORKLOADS = {
    "dc_cifar10_ipc50_k4": (ZOO, 500, 32, 3, 10),
    "dc_cifar10_ipc50_k4_skewed": (SKEWED, 500, 32, 3, 10),
    "dc_cifar10_ipc10_k4": (ZOO, 100, 32, 3, 10),
    "dc_cifar10_ipc10_k4_skewed": (SKEWED, 100, 32, 3, 10),
    "dc_cifar10_ipc1_k4": (ZOO, 10, 32, 3, 10),
    "tiny_imagenet_ipc1_k4_64px": (IMAGENET_FORM, 200, 64, 3, 200),  # ImageNet-form networks, IPC 1
    "imagenet_torchvision_b256_224": (TORCHVISION, 256, 224, 3, 1000),  # GPU (benchmarks/gpu_proof.py)
    "smoke_k2_b8_16px": (("ConvNetD1", "ConvNetD2"), 8, 16, 3, 10),  # gpu_proof.py --dry-run
}
CPU_WORKLOADS = ["dc_cifar10_ipc50_k4", "dc_cifar10_ipc50_k4_skewed"]
PRECISION_PROVIDERS = ("floor_bf16", "keep_bf16", "stream_bf16") + (
    ("floor_fp16", "keep_fp16") if torch.cuda.is_available() else ())
ALL_PROVIDERS = ("floor", "eager", "keep", "stream", "stream_budget", "stream_cvar") + PRECISION_PROVIDERS
# --providers reaches the timing processes (benchmarks/run.py's children) through the environment
PROVIDERS = tuple(os.environ.get("METADD_BENCH_PROVIDERS", ",".join(ALL_PROVIDERS)).split(","))
BUDGET_MB = 100  # "stream_budget": about 5 images of the zoo mix's 32x32 graphs (9.4 MB each) per chunk
MODES = ("full",)
TIMING = dict(warmup=1, reps=3)
MEMORY_CALLS = 1
OPS = {"metadd_loss": None}
_losses: dict = {}


def make_inputs(name: str, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    names, B, size, channel, classes = WORKLOADS[name]
    torch.manual_seed(seed)
    models = [_network(n, channel, classes, size).to(device).eval().requires_grad_(False) for n in names]
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, channel, size, size, generator=g).to(device, dtype).requires_grad_()
    labels = torch.randint(0, classes, (B,), generator=g).to(device)
    return models, images, labels


def _network(name: str, channel: int, classes: int, size: int):
    """A zoo network, or ``torchvision:NAME`` built by torchvision with weights=None."""
    if name.startswith("torchvision:"):
        import torchvision

        return torchvision.models.get_model(name.split(":", 1)[1], weights=None, num_classes=classes)
    return get_model(name, channel, classes, (size, size))


def floor(models, images, labels):
    """The sum over the K networks of their label scores: its gradient to the images costs one
    forward with grad and one backward of each network."""
    return sum(m(images).float().gather(1, labels[:, None]).sum() for m in models)


def run(op: str, provider: str, inputs):
    models, images, labels = inputs
    base, _, precision = provider.partition("_")
    precision = precision if precision in mf.precision.PRECISIONS else "fp32"
    if base == "floor":
        with mf.precision.autocast(precision, images.device.type):
            return floor(models, images, labels)
    key = (id(models), provider)
    if key not in _losses:
        kw = dict(memory="keep" if base in ("eager", "keep") else "stream",
                  alpha=0.3 if provider == "stream_cvar" else None,
                  backend="reference" if provider == "eager" else None,
                  memory_budget=BUDGET_MB if provider == "stream_budget" else None, precision=precision)
        _losses[key] = mf.MetaDDLoss(models, **kw)
    return _losses[key](images, labels)


def leaves(inputs):
    return inputs[1]


def min_bytes(inputs, mode: str) -> int:
    """The images read and their gradient written (the models' own traffic is not counted)."""
    _, images, _ = inputs
    return 2 * images.numel() * images.element_size()


def main():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from run import RESULTS, append_rows, run_child, run_meta

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=None)
    ap.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS, default=list(ALL_PROVIDERS),
                    help="the providers to run (floor and keep always run: the ratios' bases)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    providers = [p for p in ALL_PROVIDERS if p in {"floor", "keep", *args.providers}]
    os.environ["METADD_BENCH_PROVIDERS"] = ",".join(providers)
    meta = run_meta(args.device)
    print(f"device: {meta['device']}")
    print(f"{'workload':28} {'provider':13} {'p50 ms':>10} {'x floor':>8} {'x keep':>7} {'extra MB':>9} {'x keep':>7}")
    for workload in args.workloads or (list(WORKLOADS) if args.device == "cuda" else CPU_WORKLOADS):
        times = run_child("metadd_loss", workload, args.device, "time")["full"]["time"]
        memory = run_child("metadd_loss", workload, args.device, "memory")["full"]
        rows = []
        for p in providers:
            t = times[p][0]
            ratios = {"time_vs_floor": t / times["floor"][0], "time_vs_keep": t / times["keep"][0],
                      "memory_vs_keep": memory[p] / memory["keep"]}
            if "eager" in providers:
                ratios.update(time_vs_naive=t / times["eager"][0], memory_vs_naive=memory[p] / memory["eager"])
            print(f"{workload:28} {p:13} {t * 1e3:10.1f} {ratios['time_vs_floor']:8.2f} {ratios['time_vs_keep']:7.2f} "
                  f"{memory[p] / 1e6:9.1f} {ratios['memory_vs_keep']:7.2f}", flush=True)
            metrics = [("time", "ms", t * 1e3), ("peak_extra_memory", "MB", memory[p] / 1e6)]
            metrics += [(name, "x", value) for name, value in ratios.items()]
            rows += [dict(op="metadd_loss", provider=p, mode="full", workload=workload, metric=metric, unit=unit,
                          p50=f"{value:.4f}", p20="", p80="", **meta) for metric, unit, value in metrics]
        append_rows(args.out, rows)  # each finished workload is on disk before the next starts


if __name__ == "__main__":
    main()
