"""MetaDDLoss(precision=...): the networks under torch.autocast, the CAM math in float32.

Bounds (docs/precision.md): on the same low-precision features, the fused CAM ops give the
gradient of the float64 CAM math to 2e-2 relative (the only difference is the rounding of
the feature gradient to the features' dtype; 5e-2 in stream mode, whose chunks the bf16
kernels round differently); against fp32, on networks whose bf16 gradient
is well conditioned (ConvNet, AlexNet; LeNet for Grad-CAM), cosine >= 0.95 (bf16) and
>= 0.99 (fp16) and the term's value within 2e-2 relative. Deeper random-initialized
networks (ResNet18, VGG11) are measured in docs/precision.md, not bounded here.
"""
import warnings

import pytest
import torch
from helpers import rel_err

import metadd_fast as mf
from metadd_fast import precision as prec
from metadd_fast import reference
from metadd_fast.models import get_model

SIZE = 32
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _nets(names=("ConvNet", "AlexNet")):
    torch.manual_seed(11)
    return [get_model(n, 3, 10, (SIZE, SIZE)).eval() for n in names]


def _batch(B=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (B,), generator=g)


def _grad(loss_fn, x, y):
    x = x.clone().requires_grad_()
    loss = loss_fn(x, y)
    (g,) = torch.autograd.grad(loss * 1.7, x)
    return loss.detach(), g


def _cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), 0))


def _float64_cam_loss(models, x, y, dtype, alpha):
    """The term with the networks under autocast(dtype), as MetaDDLoss runs them, and the CAM
    maps, their variance and the CVaR in float64 (the plain-PyTorch reference ops)."""
    raws, sizes = [], []
    for m in models:
        t = mf.cam_target(m)
        with torch.no_grad():
            t.probe(x[:2].detach())
        with torch.autocast("cpu", dtype=dtype):
            A, _ = t.run(x)
        assert A.dtype == dtype and t.kind in ("linear", "flatten")
        raws.append(reference.raw_cam(A.double(), t.head_weight(A).double(), y))
        sizes.append(tuple(A.shape[2:]))
    out_size = (max(h for h, _ in sizes), max(w for _, w in sizes))
    v = reference.map_variance(reference.normalized_maps(raws, out_size).flatten(2))
    return v.mean() if alpha is None else reference.cvar(v, alpha)


def test_precision_checked():
    with pytest.raises(ValueError, match="precision: expected one of 'fp32', 'bf16', 'fp16', got 'tf32'"):
        mf.MetaDDLoss(_nets(), precision="tf32")
    fn = mf.MetaDDLoss([m.double() for m in _nets()], precision="bf16")
    x, y = _batch()
    with pytest.raises(ValueError, match="precision: 'bf16' runs float32 networks in low precision; got float64"):
        fn(x.double().requires_grad_(), y)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_networks_run_in_low_precision_and_are_left_as_they_were(precision):
    models = _nets(("ConvNet", "AlexNet", "LeNet"))  # LeNet: Grad-CAM weights from low-precision logits
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, out: seen.append(out.dtype)) for m in models]
    hooks += [m.register_forward_pre_hook(lambda mod, i: seen.clear()) for m in models[:1]]  # the last pass
    models[0].train()
    x, y = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fp16 on this CPU: the slow-path warning
        loss, g = _grad(mf.MetaDDLoss(models, precision=precision, memory="keep"), x, y)
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {DTYPES[precision]}
    assert loss.dtype == torch.float32 and g.dtype == torch.float32 and torch.isfinite(g).all()
    assert models[0].training and not models[1].training
    assert all(p.dtype == torch.float32 and p.requires_grad for m in models for p in m.parameters())


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("memory, alpha", [("keep", None), ("stream", None), ("stream", 0.5)])
def test_gradient_equals_float64_cam_math_on_the_same_features(backend, memory, alpha):
    if backend != "reference" and not mf.available(backend):
        pytest.skip(f"{backend} not available")
    models = _nets(("ConvNet", "AlexNet", "ResNet18"))
    x, y = _batch(5)
    loss, got = _grad(mf.MetaDDLoss(models, precision="bf16", backend=backend, memory=memory, alpha=alpha,
                                    chunk_size=3 if memory == "stream" else None), x, y)
    x64 = x.clone().requires_grad_()
    ref = _float64_cam_loss(models, x64, y, torch.bfloat16, alpha)
    (want,) = torch.autograd.grad(ref * 1.7, x64)
    assert rel_err(loss, ref) <= 1e-4
    # keep: the same bf16 features and feature gradients up to their last bit; stream: the
    # networks also run on chunks (and, for the CVaR, on the tail's images only), where the
    # bf16 kernels round differently from the whole batch's
    assert rel_err(got, want) <= (2e-2 if memory == "keep" else 5e-2) and got.dtype == torch.float32


@pytest.mark.parametrize("precision, min_cos", [("bf16", 0.95), ("fp16", 0.99)])
@pytest.mark.parametrize("names", [("ConvNet", "AlexNet"), ("ConvNet", "LeNet")])
def test_gradient_close_to_fp32(fused_backend, precision, min_cos, names):
    models = _nets(names)
    x, y = _batch(8)
    loss32, g32 = _grad(mf.MetaDDLoss(models, backend=fused_backend, memory="keep"), x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loss, g = _grad(mf.MetaDDLoss(models, backend=fused_backend, memory="keep", precision=precision), x, y)
    assert not torch.equal(g, g32)  # the precision took effect
    assert _cos(g, g32) >= min_cos and rel_err(loss, loss32) <= 2e-2


def test_torch_compile_equals_eager():
    models = _nets()
    x, y = _batch()
    fn = mf.MetaDDLoss(models, precision="bf16", memory="keep")
    loss, want = _grad(fn, x, y)
    compiled = torch.compile(fn, backend="aot_eager")
    got_loss, got = _grad(compiled, x, y)
    assert rel_err(got_loss, loss) <= 1e-6 and rel_err(got, want) <= 1e-2


def test_warns_once_where_the_cpu_has_no_fast_bf16(monkeypatch):
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(prec, "_warned", set())
    fn = mf.MetaDDLoss(_nets(), precision="bf16", memory="keep")
    x, y = _batch(4)
    with pytest.warns(RuntimeWarning, match="precision='bf16': this CPU has none of avx512_bf16, amx_bf16"):
        fn(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(x, y)  # once
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(prec, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mf.MetaDDLoss(_nets(), precision="bf16", memory="keep")(x, y)  # fast support: no warning
