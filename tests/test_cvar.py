"""cvar / cvar_dual / metacam_cvar against a float64 reference written from the formula of docs/ops.md section 4."""
import math
import re

import pytest
import torch
from helpers import as_float64, make_case, rel_err

import metadd_fast as mf
from metadd_fast import reference


def spec_cvar(L, alpha):
    """The formula of docs/ops.md section 4 on a Python list, with its gradient wrt L (ties by lower index)."""
    n = len(L)
    a = alpha * n
    if abs(a - round(a)) < 1e-9:
        a = float(round(a))
    f = math.floor(a)
    order = sorted(range(n), key=lambda j: (-L[j], j))
    w = [0.0] * n
    for r, j in enumerate(order, start=1):
        w[j] = 1 / a if r <= f else ((a - f) / a if r == f + 1 else 0.0)
    return sum(wj * L[j] for j, wj in enumerate(w)), w


def test_reference_matches_spec_formula_by_hand():
    x = torch.tensor([1.0, 4.0, 3.0, 2.0], dtype=torch.float64)
    assert reference.cvar(x, 0.5).item() == pytest.approx(3.5)
    assert reference.cvar(x, 0.3).item() == pytest.approx((4 + 0.2 * 3) / 1.2)
    assert reference.cvar(x, 1.0).item() == pytest.approx(2.5)
    assert reference.cvar(x, 0.25).item() == pytest.approx(4.0)
    g = torch.tensor([0, 0, 1, 3])  # group 2 empty: means [2.5, 3, 2]
    assert reference.cvar(x, 0.5, g, 4).item() == pytest.approx((3 + 0.5 * 2.5) / 1.5)


@pytest.mark.parametrize("alpha", [0.1, 0.37, 0.5, 0.77, 1.0])
def test_cvar_equals_min_over_eta_of_the_dual(alpha):
    x = torch.randn(41, dtype=torch.float64)
    # The dual is piecewise linear in eta with kinks at the values: its minimum is at one of them.
    dual_min = min(reference.cvar_dual(x, eta, alpha).item() for eta in x.tolist())
    assert reference.cvar(x, alpha).item() == pytest.approx(dual_min, rel=1e-12, abs=1e-12)


def _check(backend, values, alpha, groups=None, num_groups=None, tol=1e-5):
    """Value (accumulated in float32 or wider) within tol; the gradient, returned in the
    values' dtype, within tol, or 2e-2 for float16/bfloat16."""
    grad_tol = 2e-2 if values.dtype in (torch.float16, torch.bfloat16) else tol
    values = values.detach().requires_grad_()
    out = mf.cvar(values, alpha, groups, num_groups, backend=backend)
    L = values.detach().double()
    if groups is not None:
        L = reference.group_means(L, groups, num_groups)
    want, w = spec_cvar(L.tolist(), alpha)
    assert out.dtype == (torch.float64 if values.dtype == torch.float64 else torch.float32)
    assert abs(out.item() - want) <= tol * max(abs(want), 1e-3), (out.item(), want)
    go = 1.7
    (got,) = torch.autograd.grad(out, values, torch.tensor(go, dtype=out.dtype))
    if groups is None:
        want_grad = torch.tensor(w, dtype=torch.float64) * go
    else:
        counts = torch.bincount(groups, minlength=num_groups)
        nonempty = torch.nonzero(counts).flatten()
        per_group = torch.zeros(num_groups, dtype=torch.float64)
        per_group[nonempty] = torch.tensor(w, dtype=torch.float64) / counts[nonempty]
        want_grad = per_group[groups] * go
    assert got.dtype == values.dtype
    assert rel_err(got, want_grad) <= grad_tol


@pytest.mark.parametrize("alpha", ["1/N", 0.1, 0.37, 0.5, 1.0])
@pytest.mark.parametrize("N", [1, 10, 37, 3001])
def test_cvar_over_values(fused_backend, alpha, N):
    alpha = 1 / N if alpha == "1/N" else alpha
    _check(fused_backend, torch.randn(N), alpha)


@pytest.mark.parametrize("alpha", ["1/n", 0.1, 0.37, 0.5, 1.0])
def test_cvar_over_groups_of_very_different_sizes_with_empty_groups(fused_backend, alpha):
    num_groups = 40
    sizes = torch.zeros(num_groups, dtype=torch.int64)
    live = torch.randperm(num_groups)[:25]  # 15 groups stay empty
    sizes[live] = torch.randint(1, 4, (25,))
    sizes[live[0]] = 2000  # one giant group
    groups = torch.repeat_interleave(torch.arange(num_groups), sizes)
    groups = groups[torch.randperm(groups.numel())]
    alpha = 1 / 25 if alpha == "1/n" else alpha
    _check(fused_backend, torch.randn(groups.numel()), alpha, groups, num_groups)


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.55])
def test_ties_break_by_lower_index(fused_backend, alpha):
    values = torch.randint(0, 3, (20,)).float()  # many exact ties, also at the boundary
    _check(fused_backend, values, alpha)
    groups = torch.arange(20) % 7
    tied = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 0.0])[groups]  # tied group means
    _check(fused_backend, tied, alpha, groups, 7)


def test_alpha_times_n_integer_within_tolerance(fused_backend):
    # 0.37 * 100 = 37.00000000000001 in floating point: treated as the integer 37.
    x = torch.randn(100, dtype=torch.float64)
    _check(fused_backend, x, 0.37, tol=1e-12)
    top = torch.sort(x, descending=True).values
    assert mf.cvar(x, 0.37, backend=fused_backend).item() == pytest.approx(top[:37].mean().item(), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(fused_backend, dtype):
    groups = torch.randint(0, 9, (300,))
    _check(fused_backend, torch.randn(300).to(dtype), 0.3, groups, 9, tol=1e-12 if dtype == torch.float64 else 1e-5)
    _check(fused_backend, torch.randn(300).to(dtype), 0.3, tol=1e-12 if dtype == torch.float64 else 1e-5)


def test_gradcheck_float64(fused_backend):
    groups = torch.tensor([0, 1, 1, 2, 2, 2, 4])
    x = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: mf.cvar(v, 0.45, groups, 5, backend=fused_backend), (x,))
    assert torch.autograd.gradcheck(lambda v: mf.cvar(v, 0.45, backend=fused_backend), (x,))


def test_nan_propagates(fused_backend):
    x = torch.randn(10)
    x[3] = float("nan")
    assert torch.isnan(mf.cvar(x, 0.2, backend=fused_backend))
    assert torch.isnan(mf.cvar(x, 0.5, torch.arange(10) % 3, 3, backend=fused_backend))


def test_inputs_not_written(fused_backend):
    x = torch.randn(50, requires_grad=True)
    g = torch.randint(0, 5, (50,))
    before = (x.detach().clone(), g.clone())
    mf.cvar(x, 0.3, g, 5, backend=fused_backend).backward()
    mf.cvar_dual(x, 0.1, 0.3, backend=fused_backend).backward()
    assert torch.equal(x.detach(), before[0]) and torch.equal(g, before[1])


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("eta", [-0.3, 0.2])
def test_cvar_dual(fused_backend, alpha, eta):
    x = torch.randn(2500, requires_grad=True)
    e = torch.tensor(eta, requires_grad=True)
    out = mf.cvar_dual(x, e, alpha, backend=fused_backend)
    x64, e64 = as_float64([x, e])
    ref = reference.cvar_dual(x64, e64, alpha)
    assert rel_err(out, ref) <= 1e-5
    got = torch.autograd.grad(out, [x, e], torch.tensor(0.7))
    want = torch.autograd.grad(ref, [x64, e64], torch.tensor(0.7, dtype=torch.float64))
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5
    assert mf.cvar_dual(x, eta, alpha, backend=fused_backend).item() == pytest.approx(out.item())


@pytest.mark.parametrize("use_groups", [False, True])
@pytest.mark.parametrize("alpha", [0.25, 0.5])
def test_metacam_cvar(fused_backend, use_groups, alpha):
    features, weights, labels = make_case(12, [(6, 4, 4), (5, 2, 2), (4, 3, 3)], ("flatten", "linear", "flatten2d"))
    groups = torch.arange(12) % 4 if use_groups else None
    out = mf.metacam_cvar(features, weights, labels, alpha, groups, 4 if use_groups else None, backend=fused_backend)
    f64, w64 = as_float64(features), as_float64(weights)
    ref = reference.metacam_cvar(f64, w64, labels, alpha, groups, 4 if use_groups else None)
    assert rel_err(out, ref) <= 1e-5
    got = torch.autograd.grad(out, features + weights)
    want = torch.autograd.grad(ref, f64 + w64)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5
    # Images outside the tail get an exactly zero feature gradient; tail images do not.
    v = reference.cam_variance(f64, w64, labels, reduction="none")
    if use_groups:
        means = reference.group_means(v, groups, 4)
        tail = torch.isin(groups, torch.argsort(means, descending=True, stable=True)[:int(alpha * 4)])
    else:
        tail = torch.zeros(12, dtype=torch.bool)
        tail[torch.argsort(v, descending=True, stable=True)[:int(alpha * 12)]] = True
    per_image = torch.stack([g.flatten(1).abs().amax(1) for g in got[:3]])  # (K, B)
    assert torch.all(per_image[:, ~tail] == 0)
    assert torch.all(per_image[:, tail].amax(0) > 0)


@pytest.mark.parametrize("args, exc, words", [
    ((torch.randn(5), 0.0), ValueError, "alpha: expected a float in (0, 1], got 0.0"),
    ((torch.randn(5), 1.5), ValueError, "alpha"),
    ((torch.randn(5), -0.1), ValueError, "alpha"),
    ((torch.randn(5), float("nan")), ValueError, "alpha"),
    ((torch.randn(5), True), TypeError, "alpha"),
    ((torch.randn(5), "0.5"), TypeError, "alpha"),
    ((torch.randn(0), 0.5), ValueError, "values: expected a non-empty tensor"),
    ((torch.randn(2, 3), 0.5), ValueError, "values: expected a 1-D"),
    ((torch.arange(5), 0.5), TypeError, "values: expected a floating tensor"),
    (([1.0, 2.0], 0.5), TypeError, "values"),
    ((torch.randn(5), 0.5, torch.rand(5)), TypeError, "groups: expected an integer tensor"),
    ((torch.randn(5), 0.5, torch.arange(4)), ValueError, "groups: expected shape (5,)"),
    ((torch.randn(5), 0.5, torch.arange(5), 3), ValueError, "groups: expected values in [0, 3)"),
    ((torch.randn(5), 0.5, torch.arange(5) - 1, 5), ValueError, "groups: expected values in [0, 5)"),
    ((torch.randn(5), 0.5, None, 3), ValueError, "num_groups: given without groups"),
    ((torch.randn(5), 0.5, torch.arange(5), 0), ValueError, "num_groups"),
    ((torch.randn(5), 0.5, torch.arange(5, device="meta"), 5), ValueError, "groups: expected a tensor on cpu"),
])
def test_bad_inputs(args, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        mf.cvar(*args)


def test_bad_dual_and_metacam_inputs():
    with pytest.raises(ValueError, match="alpha"):
        mf.cvar_dual(torch.randn(4), 0.0, 0.0)
    with pytest.raises(TypeError, match="eta"):
        mf.cvar_dual(torch.randn(4), "x", 0.5)
    with pytest.raises(ValueError, match="eta: expected a scalar"):
        mf.cvar_dual(torch.randn(4), torch.zeros(2), 0.5)
    features, weights, labels = make_case(3, [(4, 2, 2), (3, 2, 2)], ("linear", "linear"))
    with pytest.raises(ValueError, match="alpha"):
        mf.metacam_cvar(features, weights, labels, 2.0)
    with pytest.raises(ValueError, match=re.escape("groups: expected shape (3,)")):
        mf.metacam_cvar(features, weights, labels, 0.5, torch.arange(4), 4)
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialized"):
        mf.cvar(torch.randn(4), 0.5, process_group=object())


def test_opcheck():
    x = torch.randn(30, requires_grad=True)
    g = torch.randint(0, 6, (30,))
    torch.library.opcheck(torch.ops.metadd_fast.cvar.default, (x, g, 6, 0.3))
    torch.library.opcheck(torch.ops.metadd_fast.cvar.default, (x, None, 0, 0.37))
    e = torch.tensor(0.1, requires_grad=True)
    torch.library.opcheck(torch.ops.metadd_fast.cvar_dual.default, (x, e, 0.3))


def test_torch_compile_fullgraph():
    x = torch.randn(30, requires_grad=True)
    g = torch.randint(0, 6, (30,))
    fn = torch.compile(lambda v, grp: mf.cvar(v, 0.3, grp, 6) + mf.cvar_dual(v, 0.2, 0.3), fullgraph=True)
    out = fn(x, g)
    (got,) = torch.autograd.grad(out, x)
    x64 = x.detach().double().requires_grad_()
    ref = reference.cvar(x64, 0.3, g, 6) + reference.cvar_dual(x64, 0.2, 0.3)
    (want,) = torch.autograd.grad(ref, x64)
    assert rel_err(out, ref) <= 1e-5 and rel_err(got, want) <= 1e-5


def test_module():
    m = mf.CVaR(0.3, num_groups=4)
    assert "alpha=0.3" in repr(m)
    x, g = torch.randn(20), torch.arange(20) % 4
    assert torch.equal(m(x, g), mf.cvar(x, 0.3, g, 4))
    assert torch.equal(m(x), mf.cvar(x, 0.3))
