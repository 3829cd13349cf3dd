"""Benchmark workloads of the CAM-variance and MetaCAM+CVaR ops.

Every workloads module gives OPS (op name -> loss function per provider), WORKLOADS,
CPU_WORKLOADS, make_inputs, run, leaves and min_bytes (and MODES, PROVIDERS where
they differ from providers.py); benchmarks/run.py and the pytest-benchmark file time
them through providers.timed_call. Providers: "eager" (the fastest plain-PyTorch
formulation a researcher would write, autograd: see eager_choices.py), "compile"
(torch.compile of it), "fused" (Triton on CUDA, C++ on CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import metadd_fast as mf
from providers import pick
from workloads_cvar import eager_cvar

# name -> (B, [(C, H, W, head kind)], out_size, num_classes)
_DC = [(128, 4, 4, "flatten"), (512, 4, 4, "linear"), (192, 4, 4, "flatten"), (512, 2, 2, "flatten")]
_TINY = [(128, 4, 4, "flatten"), (512, 8, 8, "linear"), (192, 8, 8, "flatten"), (512, 4, 4, "flatten")]
_IMAGENET = [(512, 7, 7, "linear"), (2048, 7, 7, "linear"), (512, 7, 7, "flatten"), (1024, 7, 7, "linear")]
WORKLOADS = {
    # DC CIFAR-10 at IPC 1/10/50: ConvNet 128x4x4 flatten, ResNet18 512x4x4 linear,
    # AlexNet 192x4x4 flatten, VGG11 512x2x2 flatten.
    "dc_cifar10_ipc1": (10, _DC, (4, 4), 10),
    "dc_cifar10_ipc10": (100, _DC, (4, 4), 10),
    "dc_cifar10_ipc50": (500, _DC, (4, 4), 10),
    # Tiny-ImageNet IPC 50 at 64x64 (GPU): ConvNetD4, ResNet18, AlexNet, VGG11 maps.
    "tiny_imagenet_ipc50": (10_000, _TINY, (8, 8), 200),
    # ImageNet-1k at 7x7 maps with C up to 2048 (GPU): IPC 10, and a B=4096 batch of an IPC-50 run.
    "imagenet_ipc10": (10_000, _IMAGENET, (7, 7), 1000),
    "imagenet_b4096": (4096, _IMAGENET, (7, 7), 1000),
}
CPU_WORKLOADS = ["dc_cifar10_ipc1", "dc_cifar10_ipc10", "dc_cifar10_ipc50"]
TAIL = 0.1  # metacam_cvar: the worst 10% of the images


def make_inputs(name: str, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    """(features, weights, labels, out_size) of a workload; features require grad, weights do not."""
    B, archs, out_size, n = WORKLOADS[name]
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n, (B,), generator=g).to(device)
    features, weights = [], []
    for C, H, W, kind in archs:
        features.append(torch.randn(B, C, H, W, generator=g).to(device, dtype).requires_grad_())
        shape = (n, C) if kind == "linear" else (n, C, H, W)
        weights.append((torch.randn(shape, generator=g) * 0.05).to(device, dtype))
    return features, weights, labels, out_size


def eager_raw_cam(feature, weight, labels):
    """Raw CAM (B, H, W) of a linear head (N, C) or flatten head (N, C, H, W) / (N, C*H*W), the
    fastest plain-PyTorch way measured (eager_choices.py, forward + backward on the CPU): the
    gathered weight rows times the features, summed over channels. einsum is about 1.8x slower
    for a flatten head and 4x for a linear one at DC IPC 50 (its backward)."""
    B, C, H, W = feature.shape
    if weight.dim() == 2 and weight.shape[1] == C:
        return (weight[labels][:, :, None, None] * feature).sum(1)
    return (weight.reshape(-1, C, H, W)[labels] * feature).sum(1)


def eager_cam_variance_per_image(features, weights, labels, out_size):
    """Per-image CAM variance (B,): ReLU, min-max normalization, a bilinear resize where the map
    is not out_size already, the population variance over architectures, the pixel mean."""
    maps = []
    for feature, weight in zip(features, weights):
        r = torch.relu(eager_raw_cam(feature, weight, labels))
        lo, hi = r.amin(dim=(1, 2), keepdim=True), r.amax(dim=(1, 2), keepdim=True)
        n = (r - lo) / (hi - lo + 1e-8)
        if tuple(n.shape[1:]) != tuple(out_size):
            n = F.interpolate(n[:, None], size=tuple(out_size), mode="bilinear", align_corners=False)[:, 0]
        maps.append(n)
    return torch.stack(maps).var(dim=0, unbiased=False).mean(dim=(1, 2))


def _eager_cam(features, weights, labels, out_size):
    return eager_cam_variance_per_image(features, weights, labels, out_size).mean()


def _fused_cam(features, weights, labels, out_size):
    return mf.cam_variance(features, weights, labels, out_size=out_size)


def _eager_metacam_cvar(features, weights, labels, out_size):
    return eager_cvar(eager_cam_variance_per_image(features, weights, labels, out_size), TAIL, None, None)


def _fused_metacam_cvar(features, weights, labels, out_size):
    return mf.metacam_cvar(features, weights, labels, TAIL, out_size=out_size)


OPS = {"cam_variance": (_eager_cam, _fused_cam), "metacam_cvar": (_eager_metacam_cvar, _fused_metacam_cvar)}


def run(op: str, provider: str, inputs):
    """The loss of one provider."""
    features, weights, labels, out_size = inputs
    return pick(OPS, op, provider)(features, weights, labels, out_size)


def leaves(inputs):
    return inputs[0]


def min_bytes(inputs, mode: str) -> int:
    """Fewest bytes a fused op must move: features read once (+ weights), and in modes backward
    and full dA written once (the backward reads the features again to rebuild the maps)."""
    features, weights, _, _ = inputs
    feat = sum(f.numel() * f.element_size() for f in features)
    weight = sum(w.numel() * w.element_size() for w in weights)
    return feat + weight + (feat if mode != "forward" else 0)
