"""The benchmarks' eager providers (the fastest plain-PyTorch formulations) compute the op:
they equal the float64 reference, so the "vs eager" ratios compare like with like."""
import os
import sys

import pytest
import torch
from helpers import make_case

from metadd_fast import reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import workloads_cam  # noqa: E402
import workloads_cvar  # noqa: E402
import workloads_nearest  # noqa: E402


@pytest.mark.parametrize("archs, kinds, out_size", [
    ([(6, 4, 4), (5, 4, 4), (3, 2, 2)], ("flatten", "linear", "flatten2d"), (4, 4)),  # the DC mix, one resized
    ([(6, 3, 5), (5, 7, 7)], ("linear", "flatten"), (9, 6)),
])
def test_eager_cam_variance_is_the_reference(archs, kinds, out_size):
    features, weights, labels = make_case(7, archs, kinds, dtype=torch.float64)
    got = workloads_cam.eager_cam_variance_per_image(features, weights, labels, out_size)
    want = reference.cam_variance(features, weights, labels, out_size=out_size, reduction="none")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    g = torch.randn(7, dtype=torch.float64)
    got_g = torch.autograd.grad(got, features + weights, g)
    want_g = torch.autograd.grad(want, features + weights, g)
    for a, b in zip(got_g, want_g):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha", [1e-9, 0.1, 0.37, 1.0])
@pytest.mark.parametrize("grouped", [False, True])
def test_eager_cvar_is_the_reference(alpha, grouped):
    values = torch.randn(300, dtype=torch.float64, requires_grad=True)
    groups = torch.randint(0, 40, (300,)) if grouped else None
    n_groups = 45 if grouped else None  # some empty
    got = workloads_cvar.eager_cvar(values, alpha, groups, n_groups)
    want = reference.cvar(values, alpha, groups, n_groups)
    assert torch.allclose(got, want, rtol=1e-12)
    assert torch.allclose(*(torch.autograd.grad(t, values)[0] for t in (got, want)), rtol=1e-12)


def test_eager_nearest_centroid_is_the_reference():
    x, c = torch.randn(5000, 16, dtype=torch.float64), torch.randn(70, 16, dtype=torch.float64)
    got = workloads_nearest.eager_nearest_centroid(x, c, chunk=1000)
    want = reference.nearest_centroid(x, c)
    assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1], rtol=1e-12)
