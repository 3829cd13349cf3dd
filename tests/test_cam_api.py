"""CAM ops: bad inputs (docs/ops.md section 6), backend dispatch, torch.compile. The registration
itself (opcheck, fake tensors, double backward) is tested in test_oplib.py."""
import re

import pytest
import torch
from helpers import as_float64, make_case, rel_err

import metadd_fast as mf
from metadd_fast import reference
from metadd_fast.ops import backends


@pytest.fixture
def case():
    return make_case(3, [(4, 3, 3), (5, 2, 2)], ("flatten", "linear"))


def _call(features, weights, labels, **kw):
    return mf.cam_variance(features, weights, labels, **kw)


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda f, w, y: (f[0], w, y), TypeError, "features"),
    (lambda f, w, y: (f, w[0], y), TypeError, "weights"),
    (lambda f, w, y: (f[:1], w[:1], y), ValueError, "K >= 2"),
    (lambda f, w, y: (f, w[:1], y), ValueError, "weights"),
    (lambda f, w, y: ([f[0], f[1][:2]], w, y), ValueError, "features[1]: batch size"),
    (lambda f, w, y: ([f[0].long(), f[1]], w, y), TypeError, "features[0]"),
    (lambda f, w, y: ([f[0][0], f[1]], w, y), ValueError, "features[0]: expected a 4-D"),
    (lambda f, w, y: ([f[0][:, :0], f[1]], w, y), ValueError, "features[0]"),
    (lambda f, w, y: (f, [w[0].int(), w[1]], y), TypeError, "weights[0]"),
    (lambda f, w, y: (f, [w[0][:, :2], w[1]], y), ValueError, "weights[0]"),
    (lambda f, w, y: (f, w, y.float()), TypeError, "labels"),
    (lambda f, w, y: (f, w, y[:2]), ValueError, "labels"),
    (lambda f, w, y: (f, w, y + 100), ValueError, "labels: expected values in [0, 5)"),
    (lambda f, w, y: (f, w, y - 10), ValueError, "labels"),
    (lambda f, w, y: (f, w, None), ValueError, "weights[0]: without labels"),
    (lambda f, w, y: (f, w, [0, 1, 2]), TypeError, "labels"),
    (lambda f, w, y: (f, [w[0], w[1].to("meta")], y), ValueError, "weights[1]: expected a tensor on cpu"),
])
def test_bad_inputs_name_the_argument(case, mutate, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        _call(*mutate(*case))


@pytest.mark.parametrize("kw, exc, name", [
    (dict(norm="l2"), ValueError, "norm"),
    (dict(reduction="max"), ValueError, "reduction"),
    (dict(out_size=0), ValueError, "out_size"),
    (dict(out_size=(4, -1)), ValueError, "out_size"),
    (dict(out_size=(4, 4, 4)), TypeError, "out_size"),
    (dict(out_size=2.5), TypeError, "out_size"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(relu="yes"), TypeError, "relu"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_options_name_the_argument(case, kw, exc, name):
    with pytest.raises(exc, match=name):
        _call(*case, **kw)


def test_label_range_checked_by_every_backend(case):
    """The C++ kernels check the labels as they read the head rows; the others check in Python."""
    f, w, y = case
    bad = y.clone()
    bad[-1] = 5
    for backend in ("cpp", "triton", "reference"):
        for fn in (_call, mf.class_activation_maps):
            with pytest.raises(ValueError, match=re.escape("labels: expected values in [0, 5), got values in [")):
                fn(f, w, bad, backend=backend)
            with torch.no_grad(), pytest.raises(ValueError, match=re.escape("labels: expected values in [0, 5)")):
                fn(f, w, -bad - 1, backend=backend)


def test_missing_backend_warns_and_falls_back(case, monkeypatch):
    monkeypatch.setitem(backends._LOADED, "cpp", ImportError("not built"))
    monkeypatch.delitem(backends._DEFAULT, "cpu")
    with pytest.warns(RuntimeWarning, match="falling back to the reference"):
        out = _call(*case)
    ref = reference.cam_variance(as_float64(case[0]), as_float64(case[1]), case[2])
    assert rel_err(out, ref) <= 1e-5
    with pytest.raises(RuntimeError, match="backend='cpp' is not available"):
        _call(*case, backend="cpp")


def test_triton_on_cpu_needs_the_interpreter(case, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend: 'triton' runs on CUDA tensors"):
        _call(*case, backend="triton")


def test_torch_compile_fullgraph(case):
    features, weights, labels = case

    def loss_fn(f0, f1, w0, w1, y):
        return mf.cam_variance([f0, f1], [w0, w1], y) * 2.0 + f0.sum() * 0.0

    compiled = torch.compile(loss_fn, fullgraph=True)
    out = compiled(*features, *weights, labels)
    got = torch.autograd.grad(out, features + weights)
    f64, w64 = as_float64(features), as_float64(weights)
    ref = loss_fn(*f64, *w64, labels)
    want = torch.autograd.grad(ref, f64 + w64)
    assert rel_err(out, ref) <= 1e-5
    for g, r in zip(got, want):
        assert rel_err(g, r) <= 1e-5


def test_module_matches_function(case):
    module = mf.CAMVariance(out_size=(4, 4), norm="max", reduction="sum")
    assert "norm='max'" in repr(module)
    out = module(*case)
    assert torch.equal(out, mf.cam_variance(*case, out_size=(4, 4), norm="max", reduction="sum"))
    with pytest.raises(ValueError, match="norm"):
        mf.CAMVariance(norm="bad")
