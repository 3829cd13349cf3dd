"""DSA as DSA defines it: one operation per call, Siamese parameters, DSA's ranges, gradients."""
import math

import pytest
import torch

from metadd_fast.augment import DEFAULT_STRATEGY, OPERATIONS, DiffAugment

ALL = DEFAULT_STRATEGY.split("_")


def _const(value):
    return lambda: torch.tensor([value], dtype=torch.float64)


def test_one_operation_per_call_and_every_one_is_drawn():
    aug = DiffAugment()
    x = torch.randn(3, 2, 8, 8)
    seen = {}
    for seed in range(120):
        (name,) = aug.operations(seed)
        seen[name] = seen.get(name, 0) + 1
        y = aug(x, seed)
        if name == "flip":  # only a flip: the image or its mirror, nothing else changed
            assert torch.equal(y, x) or torch.equal(y, x.flip(3))
        if name == "cutout":  # only a cutout: every pixel kept or zeroed, a 4x4 square (or clipped) zeroed
            zeroed = (y == 0) & (x != 0)
            assert torch.equal(y[~zeroed], x[~zeroed])
            rows, cols = zeroed[0, 0].any(1).sum(), zeroed[0, 0].any(0).sum()
            assert 2 <= rows <= 4 and 2 <= cols <= 4
    assert set(seen) == set(ALL) and min(seen.values()) >= 8
    assert DiffAugment(mode="M").operations(0) == ALL


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_transform_for_any_batch(name):
    aug = DiffAugment(name)
    real, syn = torch.randn(7, 3, 10, 12), torch.randn(2, 3, 10, 12)
    for seed in range(5):
        both = aug(torch.cat([syn, real]), seed)
        torch.testing.assert_close(aug(syn, seed), both[:2], rtol=0, atol=1e-6)
        torch.testing.assert_close(aug(real, seed), both[2:], rtol=0, atol=1e-6)
        same = aug(syn[:1].expand(4, -1, -1, -1), seed)
        assert torch.equal(same, same[:1].expand_as(same))  # one parameter set for the batch


def test_not_siamese_draws_per_image():
    x = torch.randn(1, 3, 8, 8).expand(6, -1, -1, -1)
    y = DiffAugment("color")(x, 0, siamese=False)
    assert not torch.allclose(y[0], y[1])


def test_dsa_parameter_ranges():
    x = torch.randn(1, 1, 16, 16)
    crop = OPERATIONS["crop"](x, _const(0.9999))  # the largest shift: round(0.125 * 16) = 2 pixels
    assert torch.equal(crop[..., :14, :14], x[..., 2:, 2:]) and not crop[..., 14:, :].any()
    assert torch.equal(OPERATIONS["crop"](x, _const(0.0))[..., 2:, 2:], x[..., :14, :14])
    # scale x1.2 / x(1/1.2) and rotate +-15 degrees: compare with the affine map they should apply
    ramp = torch.linspace(-1, 1, 33).repeat(33, 1)[None, None].double()  # value = x coordinate
    for u, factor in ((0.0, 1 / 1.2), (1.0 - 1e-12, 1.2)):
        out = OPERATIONS["scale"](ramp, _const(u))
        assert abs(float(out[0, 0, 16, 20]) - factor * float(ramp[0, 0, 16, 20])) < 1e-3
    out = OPERATIONS["rotate"](ramp, _const(1.0 - 1e-12))
    angle = math.radians(15)
    # the sampled point of pixel (row 16, col 24) is (cos a * x, sin a * x): its value is cos a * x
    assert abs(float(out[0, 0, 16, 24]) - math.cos(angle) * float(ramp[0, 0, 16, 24])) < 2e-3
    bright = OPERATIONS["color"](torch.zeros(1, 3, 4, 4), lambda: torch.tensor([1.0], dtype=torch.float64))
    assert torch.allclose(bright, torch.full_like(bright, 0.5))  # brightness +0.5 at most (DSA: ratio 1.0)


@pytest.mark.parametrize("name", ALL)
def test_every_operation_is_differentiable(name):
    aug = DiffAugment(name)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    for seed in (1, 2):
        assert torch.autograd.gradcheck(lambda t: aug(t, seed), (x,))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"strategy: expected operation names .* got 'color_blur' \(unknown: 'blur'\)"):
        DiffAugment("color_blur")
    with pytest.raises(ValueError, match="mode"):
        DiffAugment(mode="X")
    with pytest.raises(ValueError, match=r"x: expected a 4-D \(B, C, H, W\) tensor"):
        DiffAugment()(torch.zeros(2, 3, 4), 0)
    with pytest.raises(TypeError, match="x: expected a floating tensor"):
        DiffAugment()(torch.zeros(2, 3, 4, 4, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match=r"seed: expected an int in \[0, 2\*\*63 - 1\], got 1180591620717411303424"):
        DiffAugment()(torch.zeros(2, 3, 4, 4), 2 ** 70)
    with pytest.raises(TypeError, match="siamese: expected a bool, got int"):
        DiffAugment()(torch.zeros(2, 3, 4, 4), 0, siamese=1)
