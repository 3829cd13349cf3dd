import importlib
"""Inputs that must not break an op, on every backend (cpp, triton under the interpreter,
reference): any strides, storage offset, stride-0 expansion or channels_last on every tensor
argument; int32 and int64 ids; ties, NaN, Inf and huge coordinates in nearest_centroid; alpha*n
below 1 and NaN in the CVaR; NaN locality of the resize; sizes that would overflow.

A strided input must give exactly (bit for bit) what its contiguous copy gives, through the
public functions and through the launchers the registered ops call."""
import pytest
import torch
from helpers import NUM_CLASSES, make_case

import metadd_fast as mf
from metadd_fast import reference
from metadd_fast.ops import backends

BACKENDS = [b for b in ("cpp", "triton") if mf.available(b)] + ["reference"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# --- layouts -------------------------------------------------------------------------------

def _storage_offset(t):
    """t's values in a tensor that starts 3 elements into its storage."""
    flat = torch.empty(t.numel() + 3, dtype=t.dtype)
    flat[3:] = t.reshape(-1)
    return flat[3:].view(t.shape)


def _strided(t):
    """t's values, every other element of a larger tensor along the last dimension."""
    big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    big[..., ::2] = t
    return big[..., ::2]


def _transposed(t):
    """t's values in a tensor whose last two dimensions (or only dimension, reversed storage
    order of a 2-D buffer) are swapped in memory."""
    if t.dim() == 1:
        return t[None].t().contiguous().t()[0]
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else _transposed(t)


LAYOUTS = {"offset": _storage_offset, "strided": _strided, "transposed": _transposed,
           "channels_last": _channels_last}


def _expanded(t):
    """A stride-0 tensor of t's shape: its first entry along dim 0 repeated (values differ from t)."""
    return t[:1].expand(t.shape)


def _leaves(ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _same(a, b):
    return a.shape == b.shape and torch.equal(torch.nan_to_num(a, 7.0), torch.nan_to_num(b, 7.0)) and torch.equal(
        a.isnan(), b.isnan())


# --- strides: CAM --------------------------------------------------------------------------

def _cam_run(backend, features, weights, labels, make, target, copy):
    """(per-image variances, gradients of the feature and weight leaves) with grad_output != 1,
    ``target`` ("features", "weights" or "labels") passed through the layout ``make``, and then
    through a contiguous copy when ``copy`` (inside the graph: the leaves' gradients compare)."""
    f_in, w_in = _leaves(features), _leaves(weights)
    lay = (lambda t: make(t).contiguous()) if copy else make
    f = [lay(t) for t in f_in] if target == "features" else f_in
    w = [lay(t) for t in w_in] if target == "weights" else w_in
    lab = lay(labels) if target == "labels" else labels
    v = mf.cam_variance(f, w, lab, reduction="none", backend=backend)
    go = torch.linspace(0.5, 1.5, v.numel(), dtype=v.dtype)
    return v, torch.autograd.grad(v, f_in + w_in, go)


CAM_LAYOUTS = ([(layout, target, torch.int64) for target in ("features", "weights") for layout in [*LAYOUTS, "expanded"]]
               + [(layout, "labels", dtype) for layout in ("offset", "strided", "expanded")
                  for dtype in (torch.int64, torch.int32)])


@pytest.mark.parametrize("layout, target, label_dtype", CAM_LAYOUTS)
def test_cam_any_layout_equals_contiguous(backend, layout, target, label_dtype):
    features, weights, labels = make_case(5, [(6, 3, 3), (5, 4, 2), (3, 3, 3)], ("flatten", "linear", "flatten2d"))
    make = _expanded if layout == "expanded" else LAYOUTS[layout]
    case = (backend, features, weights, labels.to(label_dtype), make, target)
    v, grads = _cam_run(*case, copy=False)
    want_v, want_grads = _cam_run(*case, copy=True)
    assert _same(v, want_v)
    for g, w in zip(grads, want_grads):
        assert _same(g, w)


def test_cam_strided_int64_labels_give_the_right_variances(backend):
    """The bug of issue 13: a strided int64 label tensor gave wrong variances in Triton."""
    features, weights, labels = make_case(6, [(4, 3, 3), (5, 2, 2)], ("linear", "flatten"))
    strided = _strided(labels)
    assert strided.stride(0) == 2 and strided.dtype == torch.int64
    want = reference.cam_variance([f.double() for f in features], [w.double() for w in weights], labels,
                                  reduction="none")
    got = mf.cam_variance(features, weights, strided, reduction="none", backend=backend)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", [b for b in ("cpp", "triton") if mf.available(b)])
def test_cam_launchers_take_any_layout(name):
    """The launchers themselves (what the registered ops call) read strided inputs right."""
    impl = backends.CPP if name == "cpp" else backends.TRITON
    features, weights, labels = make_case(4, [(5, 3, 3), (4, 2, 3)], ("flatten", "linear"))
    heads = [weights[0].detach().reshape(NUM_CLASSES, 5, 9), weights[1].detach().reshape(NUM_CLASSES, 4, 1)]
    feats = [f.detach() for f in features]
    want_u, want_r = impl.cam_maps_forward(feats, heads, [labels, labels], 5, 4, True, 2, 1e-8)
    same_label = torch.full((4,), 2)
    want_u2, _ = impl.cam_maps_forward(feats, heads, [labels, same_label], 5, 4, True, 2, 1e-8)
    u2, _ = impl.cam_maps_forward(feats, heads, [labels, torch.tensor([2]).expand(4)], 5, 4, True, 2, 1e-8)
    assert _same(u2, want_u2)
    odd = ([_channels_last(f) for f in feats], [_strided(h) for h in heads], [_strided(labels.int()), _strided(labels)])
    u, r = impl.cam_maps_forward(*odd, 5, 4, True, 2, 1e-8)
    assert _same(u, want_u) and all(_same(a, b) for a, b in zip(r, want_r))
    du = torch.randn_like(want_u)
    want = impl.cam_maps_backward(du, feats, heads, [labels, labels], want_r, 5, 4, True, 2, 1e-8, [True, True],
                                  [True, True])
    got = impl.cam_maps_backward(_transposed(du), *odd, [_strided(t) for t in r], 5, 4, True, 2, 1e-8, [True, True],
                                 [True, True])
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert _same(a, b)
    maps = torch.randn(3, 4, 6)
    assert _same(impl.map_variance_forward(_transposed(maps)), impl.map_variance_forward(maps))
    g = torch.randn(4)
    assert _same(impl.map_variance_backward(_strided(g), _strided(maps)), impl.map_variance_backward(g, maps))


# --- strides: CVaR ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["offset", "strided", "expanded"])
@pytest.mark.parametrize("target, group_dtype", [("values", None), ("values", torch.int64), ("groups", torch.int64),
                                                 ("groups", torch.int32)])
def test_cvar_any_layout_equals_contiguous(backend, layout, target, group_dtype):
    make = _expanded if layout == "expanded" else LAYOUTS[layout]
    values = torch.randn(40)
    groups = None if group_dtype is None else torch.randint(0, 7, (40,)).to(group_dtype)
    results = []
    for copy in (False, True):
        lay = (lambda t: make(t).contiguous()) if copy else make
        leaf = values.clone().requires_grad_()
        v = lay(leaf) if target == "values" else leaf
        g = lay(groups) if target == "groups" else groups
        out = mf.cvar(v, 0.3, g, None if groups is None else 7, backend=backend)
        results.append((out, *torch.autograd.grad(out * 1.3, [leaf])))
    assert all(_same(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("layout", ["offset", "strided", "expanded"])
def test_cvar_dual_any_layout_equals_contiguous(backend, layout):
    make = _expanded if layout == "expanded" else LAYOUTS[layout]
    values, eta = torch.randn(33), torch.tensor(0.1)
    results = []
    for lay in (make, lambda t: make(t).contiguous()):
        leaf = values.clone().requires_grad_()
        out = mf.cvar_dual(lay(leaf), eta, 0.4, backend=backend)
        results.append((out, *torch.autograd.grad(out, [leaf])))
    assert all(_same(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("name", [b for b in ("cpp", "triton") if mf.available(b)])
def test_cvar_launchers_take_any_layout(name):
    impl = backends.CPP if name == "cpp" else backends.TRITON
    values, groups = torch.randn(50), torch.randint(0, 6, (50,))
    want = impl.cvar_group_stats(values, groups, 6)
    for v, g in [(_strided(values), _strided(groups.int())), (_storage_offset(values), _expanded(groups))]:
        got = impl.cvar_group_stats(v, g, 6)
        exp = impl.cvar_group_stats(v.contiguous(), g.long().contiguous(), 6)
        assert all(_same(a, b) for a, b in zip(got, exp))
    loss, w = impl.cvar_tail(want[0], want[1], 0.4)
    loss2, w2 = impl.cvar_tail(_strided(want[0]), _strided(want[1]), 0.4)
    assert _same(loss, loss2) and _same(w, w2)
    grad = torch.tensor(1.5)
    d = impl.cvar_values_grad(grad, w, want[1], groups, values)
    d2 = impl.cvar_values_grad(grad, _strided(w), _strided(want[1]), _strided(groups.int()), _strided(values))
    assert _same(d, d2) and d2.is_contiguous()


# --- strides: nearest centroid -----------------------------------------------------------------

@pytest.mark.parametrize("layout", [*LAYOUTS, "expanded"])
@pytest.mark.parametrize("target", ["x", "centroids"])
def test_nearest_centroid_any_layout_equals_contiguous(backend, layout, target):
    make = _expanded if layout == "expanded" else LAYOUTS[layout]
    x, c = torch.randn(30, 7), torch.randn(9, 7)
    x_in, c_in = (make(x), c) if target == "x" else (x, make(c))
    got = mf.nearest_centroid(x_in, c_in, backend=backend)
    want = mf.nearest_centroid(x_in.contiguous(), c_in.contiguous(), backend=backend)
    assert all(_same(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("name", [b for b in ("cpp", "triton") if mf.available(b)])
def test_nearest_centroid_launcher_takes_any_layout(name):
    impl = backends.CPP if name == "cpp" else backends.TRITON
    x, c = torch.randn(20, 5), torch.randn(6, 5)
    cn = (c * c).sum(1)
    want = impl.nearest_centroid_forward(x, c, cn, cn.max().sqrt())
    got = impl.nearest_centroid_forward(_transposed(x), _strided(c), _strided(cn), cn.max().sqrt())
    assert all(_same(a, b) for a, b in zip(got, want))


# --- nearest centroid: ties, NaN, Inf, huge ------------------------------------------------------

def direct_oracle(x, c):
    """The float64 direct-distance answer the op promises (NaN as argmin has it)."""
    d = ((x.double()[:, None] - c.double()[None]) ** 2).sum(-1)
    i = d.argmin(1)
    return i, d.gather(1, i[:, None])[:, 0].to(x.dtype)


def check_direct(backend, x, c):
    index, sqdist = mf.nearest_centroid(x, c, backend=backend)
    want_i, want_d = direct_oracle(x, c)
    assert torch.equal(index, want_i), (index, want_i)
    assert _same(sqdist, want_d) or torch.allclose(sqdist, want_d, rtol=1e-6, equal_nan=True)


def test_ties_go_to_the_lowest_index_identical_centroids_included(backend):
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [-1.0, 0.0], [0.5, 0.5]])
    index, _ = mf.nearest_centroid(x, c, backend=backend)
    assert index.tolist() == [0, 0, 1, 0, 3, 0]
    check_direct(backend, x, c)
    many = c.repeat(40, 1)  # 200 centroids: ties across tiles of the fused kernels
    assert mf.nearest_centroid(x, many, backend=backend)[0].tolist() == [0, 0, 1, 0, 3, 0]


@pytest.mark.parametrize("case", ["nan_x", "nan_c", "inf_x", "inf_c", "inf_both", "huge_x", "huge_c", "huge_all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nonfinite_and_huge_coordinates_give_the_direct_answer(backend, case, dtype):
    x, c = torch.randn(37, 6, dtype=dtype), torch.randn(11, 6, dtype=dtype)
    big = 1e20 if dtype == torch.float32 else 1e160
    if case == "nan_x":
        x[3, 1] = x[20, 0] = float("nan")
    elif case == "nan_c":
        c[5, 2] = c[8, 0] = float("nan")
    elif case == "inf_x":
        x[2, 4], x[9, 0] = float("inf"), float("-inf")
    elif case == "inf_c":
        c[1, 3] = float("inf")
    elif case == "inf_both":
        x[0, 0] = c[4, 0] = float("inf")
    elif case == "huge_x":
        x[5] *= big
        x[6, 0] = big
    elif case == "huge_c":
        c[3] *= big
        c[7, 2] = -big
    else:
        x, c = x * big, c * big
    check_direct(backend, x, c)


def test_nan_semantics_are_argmins():
    """What NaN gives, spelled out: a NaN row goes to centroid 0; a NaN centroid (the first of
    them) takes every other row, with a NaN squared distance."""
    x, c = torch.randn(4, 3), torch.randn(5, 3)
    x[1, 0] = float("nan")
    index, sqdist = reference.nearest_centroid(x, c)
    assert index[1] == 0 and sqdist[1].isnan()
    c[3, 1] = c[4, 1] = float("nan")
    index, sqdist = reference.nearest_centroid(x, c)
    assert index.tolist() == [3, 0, 3, 3] and sqdist.isnan().all()  # row 1 is all NaN: argmin's first


def test_direct_oracle_chunks_like_one_block(monkeypatch):
    x, c = torch.randn(50, 9), torch.randn(23, 9)
    c[7] = c[2]
    want = reference.nearest_centroid(x, c)
    monkeypatch.setattr(importlib.import_module("metadd_fast.ops.nearest_centroid"), "_BLOCK", 40)  # 1 row x 4 centroids x 9 dims per block
    got = reference.nearest_centroid(x, c)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --- CVaR: alpha * n below 1, NaN in the dual ----------------------------------------------------

@pytest.mark.parametrize("alpha", [1e-12, 1e-3, 0.15])
@pytest.mark.parametrize("n", [1, 2, 6])
def test_cvar_tail_below_one_entry_is_the_largest(backend, alpha, n):
    values = torch.randn(n, dtype=torch.float64)
    values[n // 2] = 5.0  # the largest, once
    x = values.clone().requires_grad_()
    out = mf.cvar(x, alpha, backend=backend)
    assert out.item() == 5.0
    (g,) = torch.autograd.grad(out, [x])
    assert g.tolist() == [1.0 if i == n // 2 else 0.0 for i in range(n)]
    groups = torch.arange(n).repeat_interleave(2)
    pairs = values.repeat_interleave(2)
    assert mf.cvar(pairs, alpha, groups, n, backend=backend).item() == 5.0


@pytest.mark.parametrize("where", ["values", "eta", "both"])
def test_cvar_dual_gradient_at_nan_is_autograds(backend, where):
    values = torch.tensor([0.5, float("nan"), -1.0, 2.0, 0.1])
    eta = torch.tensor(0.2)
    if where != "values":
        eta = torch.tensor(float("nan"))
    if where == "eta":
        values = torch.tensor([0.5, 1.0, -1.0, 2.0, 0.1])
    v1, e1 = values.clone().requires_grad_(), eta.clone().requires_grad_()
    v2, e2 = values.clone().requires_grad_(), eta.clone().requires_grad_()
    out = mf.cvar_dual(v1, e1, 0.4, backend=backend)
    want = e2 + torch.relu(v2 - e2).sum() / (0.4 * values.numel())
    assert out.isnan() and want.isnan()
    got_g = torch.autograd.grad(out * 0.7, [v1, e1])
    want_g = torch.autograd.grad(want * 0.7, [v2, e2])
    for g, w in zip(got_g, want_g):
        assert torch.allclose(g, w, rtol=1e-6), (g, w)


# --- the resize keeps NaN and Inf local ------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("sizes", [((7, 7), (30, 30)), ((5, 3), (11, 4)), ((6, 6), (4, 4))])
def test_resize_keeps_nan_and_inf_local(backend, bad, sizes):
    (H, W), out = sizes
    features, weights, labels = make_case(2, [(3, H, W), (4, H, W)], ("linear", "linear"))
    with torch.no_grad():
        features[0][1, :, 2, 1] = bad
    opts = dict(out_size=out, norm="none", relu=False)
    maps = mf.class_activation_maps(features, weights, labels, backend=backend, **opts)
    ref = reference.class_activation_maps([f.double() for f in features], [w.double() for w in weights], labels,
                                          **opts)
    assert torch.equal(maps.isnan(), ref.isnan()) and torch.equal(maps.isinf(), ref.isinf())
    bad_count = int((~ref.isfinite()).sum())
    assert 0 < bad_count < ref.numel() // 4  # local: a few output pixels, not the map
    fin = ref.isfinite()
    assert torch.allclose(maps.double()[fin], ref[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes", [((7, 7), (30, 30)), ((5, 3), (11, 4)), ((6, 6), (4, 4))])
def test_resize_backward_keeps_nan_local(backend, sizes):
    (H, W), out = sizes
    features, weights, labels = make_case(2, [(3, H, W), (4, H, W)], ("linear", "flatten"))
    opts = dict(out_size=out, norm="none", relu=False)
    maps = mf.class_activation_maps(features, weights, labels, backend=backend, **opts)
    f64, w64 = _leaves([f.double() for f in features]), _leaves([w.double() for w in weights])
    ref = reference.class_activation_maps(f64, w64, labels, **opts)
    go = torch.randn(ref.shape, dtype=torch.float64)
    go[0, 1, 3, 2] = float("nan")
    go[1, 0, out[0] - 1, 0] = float("inf")
    got = torch.autograd.grad(maps, features, go.to(maps.dtype))
    want = torch.autograd.grad(ref, f64, go)
    for g, w in zip(got, want):
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.isinf(), w.isinf())
        assert 0 < int((~w.isfinite()).sum()) < w.numel() // 2
        fin = w.isfinite()
        assert torch.allclose(g.double()[fin], w[fin], rtol=1e-5, atol=1e-5)


# --- sizes that would overflow or exhaust memory -----------------------------------------------------

@pytest.mark.parametrize("out_size", [(2 ** 31, 2 ** 31), (2 ** 62, 3), 10 ** 7])
def test_absurd_out_size_is_refused_by_name(backend, out_size):
    features, weights, labels = make_case(2, [(3, 2, 2), (4, 2, 2)], ("linear", "linear"))
    for fn in (mf.cam_variance, mf.class_activation_maps):
        with pytest.raises(ValueError, match="out_size"):
            fn(features, weights, labels, out_size=out_size, backend=backend)


@pytest.mark.parametrize("num_groups", [2 ** 62, 2 ** 40])
def test_absurd_num_groups_is_refused_by_name(backend, num_groups):
    with pytest.raises(ValueError, match="num_groups"):
        mf.cvar(torch.randn(5), 0.5, torch.zeros(5, dtype=torch.int64), num_groups, backend=backend)
