"""pytest-benchmark cases of the CAM-variance op: eager reference, torch.compile(reference), fused.

    pytest benchmarks/ --benchmark-columns=min,median,max

The CSV of record (ratios in one run, peak memory, bandwidth) comes from
benchmarks/run_cam.py; this file gives the same cases to pytest-benchmark.
"""
import pytest
import torch
from cases import PROVIDERS, make_inputs, step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WORKLOADS = ["dc_cifar10_ipc50"] + (["imagenet_b4096"] if DEVICE == "cuda" else [])


@pytest.fixture(scope="module", params=WORKLOADS)
def inputs(request):
    return make_inputs(request.param, DEVICE)


def _sync(out):
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cam_variance(benchmark, inputs, provider, mode):
    benchmark.group = f"cam_variance-{mode}"
    step(provider, mode, inputs)  # warm-up (compilation)
    benchmark(lambda: _sync(step(provider, mode, inputs)))
