"""The op layer (metadd_fast.ops, docs/ops.md section 8): every op registered with torch.library
when the package is imported, per-device kernels, fake kernels, one autograd (C++, one node
per call, on every device), backend="triton" on CPU kept through the backward, double
backward, opcheck, meta/fake tensors and torch.compile in a fresh process."""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import make_case
from torch._subclasses.fake_tensor import FakeTensorMode

import metadd_fast as mf
from metadd_fast.ops import backends
from metadd_fast.ops.cam_maps import cam_maps_op, prepare_inputs
from metadd_fast.ops.cam_variance import cam_variance_op
from metadd_fast.ops.cvar import cvar_dual_op, cvar_op
from metadd_fast.ops.map_variance import map_variance_op

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ["cam_maps", "cam_maps_backward", "map_variance", "map_variance_backward", "cam_variance",
       "cam_variance_backward", "cvar", "cvar_backward", "cvar_dual", "cvar_dual_backward", "nearest_centroid"]


def _cam_args(dtype=torch.float32):
    features, weights, labels = make_case(5, [(6, 3, 3), (7, 2, 2), (3, 4, 4)], ("flatten", "linear", "linear"))
    features = [f.detach().to(dtype).requires_grad_() for f in features]
    heads = [w.detach().to(dtype).reshape(w.shape[0], w.shape[1], -1 if w.dim() > 2 else 1).requires_grad_()
             for w in weights]
    features, heads, rows = prepare_inputs(features, heads, [labels] * 3)
    return (features, heads, rows, 4, 4, True, 2, 1e-8)


def _cases():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(40, generator=g, requires_grad=True)
    groups = torch.randint(0, 7, (40,), generator=g)
    maps = torch.rand(3, 5, 16, generator=g, requires_grad=True)
    eta = torch.tensor(0.2, requires_grad=True)
    return [
        (cam_maps_op, _cam_args(), "CamMapsFunction"),
        (cam_variance_op, _cam_args(), "CamVarianceFunction"),
        (map_variance_op, (maps,), "MapVarianceFunction"),
        (cvar_op, (values, groups, 7, 0.3), "CVaRFunction"),
        (cvar_op, (values, None, 0, 0.3), "CVaRFunction"),
        (cvar_dual_op, (values, eta, 0.3), "CVaRDualFunction"),
    ]


def test_every_op_is_registered_at_import():
    for name in OPS:
        op = getattr(torch.ops.metadd_fast, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta"), name
        if name != "nearest_centroid":  # no gradient flows through it
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Autograd"), name


@pytest.mark.parametrize("index", range(6))
def test_autograd_is_one_cpp_node(index):
    """Every differentiable op records one C++ node (registered by metadd_fast._C, whatever the
    device), and none when nothing needs a gradient."""
    op, args, node = _cases()[index]
    out = op.op(*args)
    out = out if isinstance(out, tuple) else (out,)
    assert out[0].grad_fn.name() == f"torch::autograd::CppNode<metadd::(anonymous namespace)::{node}>"
    rest = [t for x in out[1:] for t in (x if isinstance(x, list) else [x])]
    assert all(t.grad_fn is None and not t.requires_grad for t in rest)
    with torch.no_grad():
        first = op.op(*args)
        assert (first[0] if isinstance(first, tuple) else first).grad_fn is None


def test_unused_outputs_get_no_materialized_gradients():
    """Only the first output carries a gradient: a backward that reaches the node with no
    gradient for it gives no gradient (and no zeros are made for the others)."""
    values = torch.randn(10, requires_grad=True)
    loss, w, counts = cvar_op.op(values, torch.randint(0, 3, (10,)), 3, 0.5)
    (g,) = torch.autograd.grad(loss * 2.0, values)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def _spy(monkeypatch, calls):
    for fn in ("cam_maps_forward", "cam_maps_backward", "cvar_group_stats", "cvar_tail", "cvar_values_grad"):
        real = getattr(backends.TRITON, fn)
        monkeypatch.setattr(backends.TRITON, fn, lambda *a, _real=real, _fn=fn: calls.append(_fn) or _real(*a))


def _cam_and_cvar(backend):
    torch.manual_seed(0)
    features, weights, labels = make_case(3, [(4, 3, 3), (5, 2, 2)], ("flatten", "linear"))
    values = torch.randn(12, requires_grad=True)
    groups = torch.randint(0, 3, (12,))
    loss = mf.cam_variance(features, weights, labels, backend=backend) + mf.cvar(values, 0.5, groups, 3,
                                                                                   backend=backend)
    return loss, features + [values]


def test_forced_triton_runs_forward_and_backward(monkeypatch):
    """backend="triton" on CPU tensors stays on the Triton kernels in the backward too, which
    runs after the forward (and its dispatch mode) has returned, and gives the C++ answer."""
    calls = []
    _spy(monkeypatch, calls)
    loss, leaves = _cam_and_cvar("triton")
    assert {"cam_maps_forward", "cvar_group_stats", "cvar_tail"} <= set(calls)
    calls.clear()
    got = torch.autograd.grad(loss, leaves)
    assert set(calls) == {"cam_maps_backward", "cvar_values_grad"}
    want_loss, want_leaves = _cam_and_cvar("cpp")
    want = torch.autograd.grad(want_loss, want_leaves)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", ["cpp", None])
def test_cpp_and_default_never_touch_triton(monkeypatch, backend):
    calls = []
    _spy(monkeypatch, calls)
    loss, leaves = _cam_and_cvar(backend)
    torch.autograd.grad(loss, leaves)
    assert calls == []


def _opcheck_cases():
    x = torch.randn(30, requires_grad=True)
    g = torch.randint(0, 6, (30,))
    maps = torch.rand(3, 4, 6, requires_grad=True)
    cam = _cam_args(torch.float64)
    unlabelled = ([f.detach() for f in cam[0][:2]], [torch.randn(5, c.shape[1], 1, dtype=torch.float64, requires_grad=True)
                                                      for c in cam[1][:2]], [torch.arange(5)] * 2, 5, 3, False, 1, 1e-6)
    e = torch.tensor(0.1, requires_grad=True)
    with torch.no_grad():
        _, w, counts = cvar_op.op(x, g, 6, 0.3)
        _, above = cvar_dual_op.op(x, e, 0.3)
    return [
        ("cam_maps", cam), ("cam_maps", unlabelled), ("cam_variance", cam), ("cam_variance", unlabelled),
        ("map_variance", (maps,)), ("map_variance_backward", (torch.randn(4, requires_grad=True), maps)),
        ("cvar", (x, g, 6, 0.3)), ("cvar", (x, None, 0, 0.37)),
        ("cvar_backward", (torch.tensor(1.5, requires_grad=True), w, counts, g, x)),
        ("cvar_dual", (x, e, 0.3)),
        ("cvar_dual_backward", (torch.tensor(0.7, requires_grad=True), x, e, 0.3, above)),
        ("nearest_centroid", (torch.randn(40, 6), torch.randn(9, 6))),
    ]


@pytest.mark.parametrize("index", range(12))
def test_opcheck(index):
    name, args = _opcheck_cases()[index]
    torch.library.opcheck(getattr(torch.ops.metadd_fast, name).default, args)


def test_opcheck_cam_backward_ops():
    """Their schema, fake kernel and AOT tracing (their own gradient is an error: see below)."""
    features, heads, rows, *rest = _cam_args(torch.float64)
    features, heads = [f.detach() for f in features], [h.detach() for h in heads]
    maps, rects = cam_maps_op.op(features, heads, rows, *rest)
    flags = [[True, False, True], [False, True, True]]
    args = (torch.randn_like(maps), features, heads, rows, rects, *rest, *flags)
    torch.library.opcheck(torch.ops.metadd_fast.cam_maps_backward.default, args)
    args = (torch.randn(maps.shape[1], dtype=maps.dtype), maps, features, heads, rows, rects, *rest, *flags)
    torch.library.opcheck(torch.ops.metadd_fast.cam_variance_backward.default, args)


def _public_calls(t):
    """(name, call) of every public op on tensors made by ``t(shape, dtype)``."""
    features = [t((3, 4, 3, 3)), t((3, 5, 2, 2))]
    weights = [t((6, 4 * 9)), t((6, 5))]
    labels = t((3,), torch.int64)
    values, groups = t((20,)), t((20,), torch.int32)
    return [
        ("class_activation_maps", lambda: mf.class_activation_maps(features, weights, labels), (2, 3, 3, 3)),
        ("cam_variance", lambda: mf.cam_variance(features, weights, labels, reduction="none"), (3,)),
        ("map_variance", lambda: mf.ops.map_variance(t((2, 3, 7))), (3,)),
        ("cvar", lambda: mf.cvar(values, 0.3, groups, 4), ()),
        ("cvar_dual", lambda: mf.cvar_dual(values, 0.2, 0.3), ()),
        ("metacam_cvar", lambda: mf.metacam_cvar(features, weights, labels, 0.5), ()),
        ("nearest_centroid", lambda: mf.nearest_centroid(t((8, 3)), t((4, 3)))[0], (8,)),
    ]


def _make(device):
    def t(shape, dtype=torch.float32):
        if dtype.is_floating_point:
            return torch.randn(shape, dtype=dtype, device=device)
        return torch.zeros(shape, dtype=dtype, device=device)

    return t


@pytest.mark.parametrize("index", range(7))
def test_meta_tensors_go_through_every_op(index):
    name, call, shape = _public_calls(_make("meta"))[index]
    out = call()
    assert out.device.type == "meta" and tuple(out.shape) == shape, name


@pytest.mark.parametrize("index", range(7))
def test_fake_tensors_go_through_every_op(index):
    with FakeTensorMode() as mode:
        def t(shape, dtype=torch.float32):
            return mode.from_tensor(_make("cpu")(shape, dtype))

        name, call, shape = _public_calls(t)[index]
        out = call()
    assert tuple(out.shape) == shape, name


# --- double backward ------------------------------------------------------------------------

def test_map_variance_gradgradcheck(fused_backend):
    maps = torch.rand(3, 4, 5, dtype=torch.float64, requires_grad=True)
    fn = lambda u: mf.ops.map_variance(u, backend=fused_backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (maps,))
    assert torch.autograd.gradgradcheck(fn, (maps,), grad_outputs=(torch.randn(4, dtype=torch.float64),))


@pytest.mark.parametrize("grouped", [True, False])
def test_cvar_gradgradcheck(fused_backend, grouped):
    values = torch.randn(23, dtype=torch.float64, requires_grad=True)
    groups = torch.randint(0, 5, (23,)) if grouped else None
    fn = lambda v: mf.cvar(v, 0.35, groups, 5 if grouped else None, backend=fused_backend)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (values,), grad_outputs=(torch.tensor(1.7, dtype=torch.float64),))
    # the derivative of the gradient wrt the upstream gradient is the gradient itself
    grad_out = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fn(values), values, grad_out, create_graph=True)
    assert g.grad_fn is not None
    (dg,) = torch.autograd.grad((g * torch.arange(23.0, dtype=torch.float64)).sum(), grad_out)
    assert torch.allclose(dg, (g.detach() * torch.arange(23.0, dtype=torch.float64)).sum())


def test_cvar_dual_gradgradcheck(fused_backend):
    values = torch.randn(17, dtype=torch.float64, requires_grad=True)
    eta = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    fn = lambda v, e: mf.cvar_dual(v, e, 0.4, backend=fused_backend)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (values, eta))


@pytest.mark.parametrize("fn_name", ["cam_variance", "class_activation_maps", "metacam_cvar"])
def test_cam_double_backward_raises(fused_backend, fn_name):
    features, weights, labels = make_case(3, [(4, 3, 3), (5, 2, 2)], ("flatten", "linear"))
    extra = (0.5,) if fn_name == "metacam_cvar" else ()
    out = getattr(mf, fn_name)(features, weights, labels, *extra, backend=fused_backend)
    (g,) = torch.autograd.grad(out.sum(), features[0], create_graph=True)
    assert g.grad_fn is not None  # never a silent first-order result
    with pytest.raises(NotImplementedError, match=re.escape("double backward")):
        g.sum().backward()


def test_reference_backend_double_backward_works():
    features, weights, labels = make_case(2, [(3, 2, 2), (2, 2, 2)], ("linear", "linear"), dtype=torch.float64)
    fn = lambda a, b: mf.cam_variance([a, b], weights, labels, backend="reference", norm="none")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, tuple(f.detach().requires_grad_() for f in features))


# --- torch.compile as the first call of a fresh process -----------------------------------

_COMPILE_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import metadd_fast as mf

    torch.manual_seed(0)
    f = [torch.randn(3, 4, 3, 3, requires_grad=True), torch.randn(3, 5, 2, 2, requires_grad=True)]
    w = [torch.randn(5, 36), torch.randn(5, 5)]
    y = torch.randint(0, 5, (3,))
    v, g = torch.randn(20, requires_grad=True), torch.randint(0, 4, (20,))

    def fn(f0, f1, w0, w1, y, v, g):
        x = f0.flatten(1)
        return (mf.cam_variance([f0, f1], [w0, w1], y) * 2 + mf.cvar(v, 0.3, g, 4) + mf.cvar_dual(v, 0.1, 0.5)
                + mf.class_activation_maps([f0, f1], [w0, w1], y).mean() + mf.nearest_centroid(x, x[:2])[1].sum())

    compiled = torch.compile(fn, fullgraph=True, dynamic=sys.argv[1] == "dynamic")
    out = compiled(*f, *w, y, v, g)  # the first call of the process
    got = torch.autograd.grad(out, f + [v])
    ref = fn(*f, *w, y, v, g)
    want = torch.autograd.grad(ref, f + [v])
    assert torch.allclose(out, ref, rtol=1e-5), (out, ref)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got, want))
    print("ok")
""")


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_torch_compile_fullgraph_first_call_in_a_fresh_process(mode):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, mode], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_readme_subpackages_are_attributes():
    for name in ("ops", "reference", "grouping", "models", "distill", "engine"):
        assert hasattr(mf, name), name


# --- MetaDDLoss goes through the checked entry points ------------------------------------

def _metadd_models():
    """Two nets whose CAMs come from their heads (flatten, linear): the labels reach the CAM op."""
    from metadd_fast.models import get_model

    return [get_model(n, 3, 10, (16, 16)).double() for n in ("ConvNet", "ResNet18")]


@pytest.mark.parametrize("memory", ["stream", "keep"])
def test_metadd_loss_checks_label_range(fused_backend, memory):
    loss_fn = mf.MetaDDLoss(_metadd_models(), memory=memory, backend=fused_backend)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape("labels: expected values in [0, 10), got values in [")):
        loss_fn(x, torch.tensor([1, 10, 2]))


@pytest.mark.parametrize("memory", ["stream", "keep"])
def test_metadd_loss_double_backward_raises(fused_backend, memory):
    chunks = dict(chunk_size=2) if memory == "stream" else {}  # streamed (the default runs one pass here)
    loss_fn = mf.MetaDDLoss(_metadd_models(), memory=memory, backend=fused_backend, **chunks)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(loss_fn(x, torch.tensor([1, 4, 2])), x, create_graph=True)
    assert g.grad_fn is not None  # never a silent first-order result
    with pytest.raises(RuntimeError, match="differentiate|double backward"):
        g.sum().backward()
