"""Benchmark workloads of one MetaDDLoss step (see workloads_cam.py for the module interface).

Providers: "eager" (the naive per-model autograd graph: reference CAMs, every model's
activations kept), "keep" (fused CAM op, activations kept), "stream" (fused, one
model alive at a time) and "stream_chunk125" (stream in chunks of 125 images).
Mode "full" = forward + backward to the images.
"""
from __future__ import annotations

import torch

import metadd_fast as mf
from metadd_fast.models import get_model

ZOO = ("ConvNet", "ResNet18", "VGG11", "AlexNet")
# name -> (B, image size, channels, classes)
WORKLOADS = {
    "dc_cifar10_ipc50_k4": (500, 32, 3, 10),
    "dc_cifar10_ipc10_k4": (100, 32, 3, 10),
}
CPU_WORKLOADS = ["dc_cifar10_ipc50_k4"]
PROVIDERS = ("eager", "keep", "stream", "stream_chunk125")
MODES = ("full",)
TIMING = dict(warmup=1, reps=3)
MEMORY_CALLS = 1
OPS = {"metadd_loss": None}
_losses: dict = {}


def make_inputs(name: str, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    B, size, channel, classes = WORKLOADS[name]
    torch.manual_seed(seed)
    models = [get_model(n, channel, classes, (size, size)).to(device) for n in ZOO]
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, channel, size, size, generator=g).to(device, dtype).requires_grad_()
    labels = torch.randint(0, classes, (B,), generator=g).to(device)
    return models, images, labels


def run(op: str, provider: str, inputs):
    models, images, labels = inputs
    key = (id(models), provider)
    if key not in _losses:
        memory = "keep" if provider in ("eager", "keep") else "stream"
        chunk = 125 if provider == "stream_chunk125" else None
        _losses[key] = mf.MetaDDLoss(models, memory=memory, chunk_size=chunk,
                                     backend="reference" if provider == "eager" else None)
    return _losses[key](images, labels)


def leaves(inputs):
    return inputs[1]


def min_bytes(inputs, mode: str) -> int:
    """The images read and their gradient written (the models' own traffic is not counted)."""
    _, images, _ = inputs
    return 2 * images.numel() * images.element_size()
