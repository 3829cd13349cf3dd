"""class_activation_maps / cam_variance against the float64 reference, per fused backend."""
import pytest
import torch
from helpers import as_float64, grads, grads_err, make_case, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metadd_fast as mf
from metadd_fast import reference

# The DC shape family, shrunk: (C, H, W) per architecture, with non-power-of-2 C.
MIXED = [(12, 4, 4), (24, 4, 4), (10, 2, 2), (7, 3, 5)]


def check_against_reference(backend, features, weights, labels, tol, reduction="mean", **options):
    """Loss (or maps) and every gradient vs the float64 reference, with grad_output != 1."""
    fn = mf.class_activation_maps if reduction == "maps" else mf.cam_variance
    ref_fn = reference.class_activation_maps if reduction == "maps" else reference.cam_variance
    if reduction != "maps":
        options["reduction"] = reduction
    out = fn(features, weights, labels, backend=backend, **options)
    f64, w64 = as_float64(features), as_float64(weights)
    ref = ref_fn(f64, w64, labels, **options)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= tol, f"value: {rel_err(out, ref):.2e}"
    go = torch.randn(ref.shape, dtype=torch.float64) if ref.dim() else torch.tensor(1.7, dtype=torch.float64)
    got = grads(out, features + weights, go.to(out.dtype))
    want = grads(ref, f64 + w64, go)
    assert [g.dtype for g in got] == [t.dtype for t in features + weights]
    assert grads_err(got, want) <= tol, f"gradients: {grads_err(got, want):.2e}"


@pytest.mark.parametrize("B", [1, 3, 37])
@pytest.mark.parametrize("kinds", [
    ("flatten", "linear", "flatten2d", "flatten"),  # the DC mix: ConvNet, ResNet18, AlexNet, VGG11
    ("linear", "linear"),
    ("sample", "sample", "sample"),
])
def test_loss_and_grads_float32(fused_backend, B, kinds):
    features, weights, labels = make_case(B, MIXED[:len(kinds)], kinds)
    check_against_reference(fused_backend, features, weights, labels, 1e-5)


@pytest.mark.parametrize("norm", ["minmax", "max", "none"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "maps"])
def test_norm_relu_reduction(fused_backend, norm, relu, reduction):
    features, weights, labels = make_case(3, MIXED[:3], ("flatten", "linear", "flatten2d"))
    check_against_reference(fused_backend, features, weights, labels, 1e-5, reduction=reduction, norm=norm, relu=relu)


@pytest.mark.parametrize("archs, out_size, norm", [
    ([(3, 1, 1), (5, 1, 1)], None, "none"),  # 1x1 maps (min-max would make them all 0)
    ([(3, 1, 1), (6, 7, 7)], None, "minmax"),  # 1x1 upsampled to 7x7
    ([(5, 14, 14), (9, 7, 7), (3, 4, 4)], None, "minmax"),  # up to 14x14
    ([(5, 14, 14), (9, 7, 7)], (4, 4), "minmax"),  # down-sampling
    ([(5, 3, 5), (9, 7, 2)], (11, 13), "minmax"),  # up-sampling to odd sizes, non-square maps
    ([(4, 6, 6), (5, 6, 6)], 9, "max"),  # int out_size
])
def test_map_sizes_and_resizing(fused_backend, archs, out_size, norm):
    kinds = ("flatten", "linear", "flatten2d")[:len(archs)]
    features, weights, labels = make_case(3, archs, kinds)
    for reduction in ("mean", "maps"):
        check_against_reference(fused_backend, features, weights, labels, 1e-5, reduction=reduction,
                                out_size=out_size, norm=norm)


def test_one_pixel_maps_minmax_are_zero(fused_backend):
    features, weights, labels = make_case(3, [(3, 1, 1), (5, 1, 1)], ("linear", "flatten"))
    maps = mf.class_activation_maps(features, weights, labels, backend=fused_backend)
    assert torch.equal(maps, torch.zeros_like(maps))


@pytest.mark.parametrize("K", [2, 5, 8])
def test_many_architectures(fused_backend, K):
    archs = [(3 + k, 2 + k % 4, 3 + k % 3) for k in range(K)]
    kinds = [("flatten", "linear", "flatten2d")[k % 3] for k in range(K)]
    features, weights, labels = make_case(2, archs, kinds)
    check_against_reference(fused_backend, features, weights, labels, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_dtype", ["same", torch.float32])
def test_half_precision_inputs(fused_backend, dtype, weight_dtype):
    weight_dtype = dtype if weight_dtype == "same" else weight_dtype
    features, weights, labels = make_case(5, MIXED, ("flatten", "linear", "flatten2d", "flatten"),
                                          dtype=dtype, weight_dtype=weight_dtype)
    check_against_reference(fused_backend, features, weights, labels, 2e-2)
    maps = mf.class_activation_maps(features, weights, labels, backend=fused_backend)
    assert maps.dtype == dtype


def test_ties_at_max_and_min_split_evenly(fused_backend):
    # Constant 2x2 blocks make raw maps with exactly tied maxima and minima (no relu).
    features, weights, labels = make_case(3, [(4, 4, 4), (3, 4, 4)], ("sample", "sample"))
    features = [f.detach()[:, :, ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3).requires_grad_()
                for f in features]
    for norm in ("minmax", "max"):
        check_against_reference(fused_backend, features, weights, None, 1e-5, norm=norm, relu=False,
                                reduction="none")


def test_all_zero_maps_after_relu(fused_backend):
    # Every pixel tied at 0 after relu: denominators are eps, gradients are exactly zero.
    features, weights, labels = make_case(2, [(4, 3, 3), (3, 3, 3)], ("sample", "sample"))
    features = [f.detach().abs().requires_grad_() for f in features]
    weights = [-w.detach().abs().requires_grad_() for w in weights]
    loss = mf.cam_variance(features, weights, backend=fused_backend)
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, features + weights):
        assert torch.equal(g, torch.zeros_like(g))


def test_grad_only_where_required(fused_backend):
    features, weights, labels = make_case(3, MIXED[:2], ("flatten", "linear"))
    weights = [w.detach() for w in weights]
    mf.cam_variance(features, weights, labels, backend=fused_backend).backward()
    f64 = as_float64(features)
    reference.cam_variance(f64, [w.double() for w in weights], labels).backward()
    assert all(w.grad is None for w in weights)
    for f, r in zip(features, f64):
        assert rel_err(f.grad, r.grad) <= 1e-5


@pytest.mark.parametrize("kinds", [("flatten", "linear"), ("sample", "sample")])
def test_gradcheck_float64(fused_backend, kinds):
    features, weights, labels = make_case(2, [(3, 3, 3), (2, 2, 4)], kinds, dtype=torch.float64)
    fn = lambda *t: mf.cam_variance(list(t[:2]), list(t[2:]), labels, out_size=(3, 4), backend=fused_backend,  # noqa: E731
                                    reduction="none")
    assert torch.autograd.gradcheck(fn, tuple(features + weights), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_nan_stays_in_its_image(fused_backend):
    features, weights, labels = make_case(4, MIXED[:2], ("flatten", "linear"))
    with torch.no_grad():
        features[0][1, 2, 1, 1] = float("nan")
    v = mf.cam_variance(features, weights, labels, reduction="none", backend=fused_backend)
    ref = reference.cam_variance(as_float64(features), as_float64(weights), labels, reduction="none")
    assert torch.isnan(v[1]) and torch.isnan(ref[1])
    keep = torch.tensor([0, 2, 3])
    assert rel_err(v[keep], ref[keep]) <= 1e-5


def test_inputs_not_written(fused_backend):
    features, weights, labels = make_case(3, MIXED[:3], ("flatten", "linear", "flatten2d"))
    before = [t.detach().clone() for t in features + weights] + [labels.clone()]
    mf.cam_variance(features, weights, labels, backend=fused_backend).backward()
    for t, b in zip(features + weights + [labels], before):
        assert torch.equal(t.detach(), b)


def test_saves_no_feature_sized_tensor(fused_backend):
    # Forward saves the inputs plus O(K*B*max(H*W, S_h*S_w)) statistics, nothing of the features' size.
    features, weights, labels = make_case(3, [(16, 4, 4), (32, 2, 2)], ("flatten", "linear"))
    inputs = {t.data_ptr() for t in features + weights}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mf.cam_variance(features, weights, labels, backend=fused_backend)
    stats = [t for t in saved if t.data_ptr() not in inputs and t.numel() > 3]
    assert stats, "the op saved nothing but its inputs"
    K, B, most = 2, 3, 16
    for t in stats:
        assert t.numel() <= K * B * most, tuple(t.shape)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_random_shapes_float64(fused_backend, data):
    K = data.draw(st.integers(2, 4), label="K")
    B = data.draw(st.integers(1, 4), label="B")
    labelled = data.draw(st.booleans(), label="labelled")
    archs = [(data.draw(st.integers(1, 9)), data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8)))
             for _ in range(K)]
    kinds = [data.draw(st.sampled_from(["linear", "flatten", "flatten2d"])) if labelled else "sample"
             for _ in range(K)]
    out_size = data.draw(st.one_of(st.none(), st.tuples(st.integers(1, 9), st.integers(1, 9))), label="out_size")
    norm = data.draw(st.sampled_from(["minmax", "max", "none"]), label="norm")
    relu = data.draw(st.booleans(), label="relu")
    features, weights, labels = make_case(B, archs, kinds, dtype=torch.float64, labelled=labelled)
    options = dict(out_size=out_size, norm=norm, relu=relu, reduction="none")
    out = mf.cam_variance(features, weights, labels, backend=fused_backend, **options)
    ref = reference.cam_variance(features, weights, labels, **options)
    go = torch.randn(B, dtype=torch.float64)
    got, want = grads(out, features + weights, go), grads(ref, features + weights, go)
    # Maps that are entirely 0 after relu give a zero loss and zero gradients in both.
    assert torch.allclose(out, ref, rtol=1e-9, atol=1e-12)
    for g, r in zip(got, want):
        assert torch.allclose(g, r, rtol=1e-8, atol=1e-10)
