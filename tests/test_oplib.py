"""The eager fast path of the fused ops (metadd_fast.oplib) against the registered custom ops:
same values and gradients bit for bit, and the custom op wherever something traces."""
import pytest
import torch
from helpers import make_case
from torch._subclasses.fake_tensor import FakeTensorMode

from metadd_fast import oplib
from metadd_fast.cam import cam_maps_op, cam_variance_op, map_variance_op, prepare_inputs
from metadd_fast.cvar import cvar_dual_op, cvar_op


def _cam_args(backend):
    features, weights, labels = make_case(5, [(6, 3, 3), (7, 2, 2), (3, 4, 4)], ("flatten", "linear", "linear"))
    heads = [w.detach().reshape(w.shape[0], w.shape[1], -1 if w.dim() > 2 else 1).requires_grad_() for w in weights]
    features, heads, rows = prepare_inputs(features, heads, [labels] * 3)
    return (features, heads, rows, 4, 4, True, 2, 1e-8, backend)


def _leaves(args):
    out = []
    for a in args:
        items = a if isinstance(a, list) else [a]
        out += [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]
    return out


def _run(call, args, weight):
    out = call(*args)
    first = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad((first * weight).sum(), _leaves(args))
    return first.detach(), grads


def _cases(backend):
    g = torch.Generator().manual_seed(3)
    values = torch.randn(40, generator=g, requires_grad=True)
    groups = torch.randint(0, 7, (40,), generator=g)
    maps = torch.rand(3, 5, 16, generator=g, requires_grad=True)
    eta = torch.tensor(0.2, requires_grad=True)
    return [
        (cam_maps_op, _cam_args(backend)),
        (cam_variance_op, _cam_args(backend)),
        (map_variance_op, (maps, backend)),
        (cvar_op, (values, groups, 7, 0.3, backend)),
        (cvar_op, (values, None, 0, 0.3, backend)),
        (cvar_dual_op, (values, eta, 0.3, backend)),
    ]


@pytest.mark.parametrize("index", range(6))
def test_eager_path_equals_custom_op(fused_backend, index):
    fused_op, args = _cases(fused_backend)[index]
    out = fused_op.op(*args)
    first = out[0] if isinstance(out, tuple) else out
    weight = torch.randn(first.shape)  # a grad_output other than 1
    want = _run(fused_op.op, args, weight)
    got = _run(fused_op, args, weight)
    assert torch.isfinite(want[0]).all()
    assert torch.equal(got[0], want[0])
    assert len(got[1]) == len(want[1]) > 0
    for a, b in zip(got[1], want[1]):
        assert torch.isfinite(b).all() and torch.equal(a, b)


def test_eager_path_only_without_tracing():
    x = torch.randn(3)
    assert oplib.untraced([x, 2, None, "cpp"])
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert not oplib.untraced([fake])
        assert not oplib.untraced([x])  # any dispatch mode sends calls to the custom op


def test_fake_tensors_go_through_the_custom_op(fused_backend):
    maps = torch.rand(3, 5, 16)
    with FakeTensorMode() as mode:
        v = map_variance_op(mode.from_tensor(maps), fused_backend)
    assert v.shape == (5,) and v.dtype == torch.float32


def test_flatten_round_trip():
    args = ([1, 2], 3, None, [], "s")
    layout, flat = oplib._flatten(args)
    assert oplib._unflatten(layout, flat) == ([1, 2], 3, None, [], "s")
    assert oplib._flatten_grads(layout, ([4, 5], None, None, None, None)) == [4, 5, None, None, None]
    assert oplib._flatten_grads(layout, (None, 6, None, [], None)) == [None, None, 6, None, None]


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_cvar_node_equals_custom_op(grouped, dtype):
    """Eager CPU calls of cvar run one C++ autograd node; it must match the registered op."""
    import metadd_fast as mf

    values = torch.randn(57).to(dtype).requires_grad_()
    groups = torch.randint(0, 9, (57,)) if grouped else None
    num_groups = 9 if grouped else None
    loss = mf.cvar(values, 0.3, groups, num_groups, backend="cpp")
    assert "CVaRNode" in loss.grad_fn.name()
    want, _, _ = cvar_op.op(values, groups, num_groups or 0, 0.3, "cpp")
    assert torch.isfinite(want) and torch.equal(loss, want)
    (got_grad,) = torch.autograd.grad(loss * 2.5, values)
    (want_grad,) = torch.autograd.grad(want * 2.5, values)
    assert torch.isfinite(want_grad).all() and want_grad.abs().sum() > 0 and torch.equal(got_grad, want_grad)
