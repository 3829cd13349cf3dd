"""CVaR tail loss over samples or groups, its dual form, and MetaCAM+CVaR (docs/ops.md section 4).

- ``metadd_fast::cvar``: values (N,) [+ groups (N,)] -> (CVaR, w, counts) where w = dCVaR/dL
  per entry (accumulation dtype) or per group (float64) and counts the group sizes. One pass
  over the values for the group statistics, then the tail selection over the n
  group means (or the N values).
- ``metadd_fast::cvar_backward``: one pass over the values: d values_i = g * w[g_i] / |g_i|.
  This is the one CVaR gradient: the C++ autograd of ``cvar`` (csrc/cvar.cpp, every
  device), torch.compile and the distributed CVaR all call it.
- ``metadd_fast::cvar_dual`` / ``cvar_dual_backward``: the Rockafellar-Uryasev form.

Both backwards are linear in the upstream gradient and piecewise constant in the values,
so their own derivative (double backward) is registered in closed form.

With ``process_group=``, ranks all-reduce their group sums and counts (or
all-gather their values when there are no groups) before the tail selection, so
every rank gets the CVaR of the union and the gradient of its own values.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import backends, checks
from .cam_variance import cam_variance, cam_variance_reference
from .registry import KernelOp, device_kernels, dispatch_context, linear_in_grad, register_double_backward

__all__ = ["cvar", "cvar_dual", "metacam_cvar", "CVaR"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha: expected a float in (0, 1], got {type(alpha).__name__}")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha: expected a float in (0, 1], got {alpha!r}")
    return float(alpha)


def check_cvar_args(values, alpha, groups, num_groups, allow_empty: bool = False) -> tuple:
    """(alpha, groups or None, num_groups) after docs/ops.md section 6's checks, except
    the range of the group ids: see :func:`_check_group_ids`. ``allow_empty``: a rank of a
    distributed CVaR may hold no values (with groups, it must then give num_groups)."""
    checks.floating_tensor("values", values, "(N,)", allow_empty=allow_empty)
    alpha = check_alpha(alpha)
    if groups is None:
        if num_groups is not None:
            raise ValueError("num_groups: given without groups")
        return alpha, None, 0
    if not isinstance(groups, Tensor):
        raise TypeError(f"groups: expected None or an integer tensor, got {type(groups).__name__}")
    checks.integer("groups", groups)
    if groups.shape != values.shape:
        raise ValueError(f"groups: expected shape {tuple(values.shape)} like values, got {tuple(groups.shape)}")
    if groups.device != values.device:
        checks.same_device([("values", values), ("groups", groups)])  # raises, naming groups
    if num_groups is None:
        if groups.numel() == 0:
            raise ValueError("num_groups: needed when this rank has no values")
        num_groups = int(groups.max()) + 1
        if num_groups <= 0:
            raise ValueError(f"groups: expected ids in [0, num_groups), got a largest id of {num_groups - 1}")
    elif isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups: expected a positive int, got {num_groups!r}")
    checks.allocation("num_groups", 16 * num_groups, values.device, f"sums and counts of {num_groups} groups")
    return alpha, groups, num_groups  # any integer dtype and layout: the kernels read them as int64


def _check_group_ids(groups: Optional[Tensor], num_groups: int, backend: str) -> None:
    """Ids in [0, num_groups). The C++ group statistics check them in their pass over the
    values (same message), so only the other backends read them here."""
    if groups is not None and backend != "cpp":
        checks.index_range("groups", groups, num_groups)


def cvar_forward(impl, values: Tensor, groups: Optional[Tensor], num_groups: int, alpha: float, all_reduce=None):
    """(CVaR, w, counts) with the launchers ``impl``; ``all_reduce`` sums group statistics across ranks."""
    acc = _acc(values.dtype)
    if groups is None:
        loss, w = impl.cvar_tail(values.to(acc).contiguous(), None, alpha)
        return loss, w, values.new_empty(0, dtype=torch.int64)
    if values.numel():
        sums, counts = impl.cvar_group_stats(values.contiguous(), groups, num_groups)
    else:  # a rank with no values in a distributed CVaR
        sums = torch.zeros(num_groups, dtype=torch.float64, device=values.device)
        counts = torch.zeros(num_groups, dtype=torch.int64, device=values.device)
    if all_reduce is not None:
        all_reduce(sums)
        all_reduce(counts)
    loss, w = impl.cvar_tail(sums, counts, alpha)  # over the means of the non-empty groups, in float64
    return loss.to(acc), w, counts


def _cvar_fake(values, groups, num_groups, alpha):
    acc = _acc(values.dtype)
    if groups is None:
        return values.new_empty((), dtype=acc), values.new_empty(values.shape[0], dtype=acc), values.new_empty(
            0, dtype=torch.int64)
    return (values.new_empty((), dtype=acc), values.new_empty(num_groups, dtype=torch.float64),
            values.new_empty(num_groups, dtype=torch.int64))


def _cvar_backward_kernel(impl):
    def cvar_backward(grad, weights, counts, groups, values):
        return impl.cvar_values_grad(grad, weights, counts if groups is not None else None, groups, values)

    return cvar_backward


cvar_op = KernelOp("cvar", "(Tensor values, Tensor? groups, SymInt num_groups, float alpha) -> (Tensor, Tensor, Tensor)",
                   lambda impl: functools.partial(cvar_forward, impl), _cvar_fake)
cvar_backward = KernelOp("cvar_backward",
                         "(Tensor grad, Tensor weights, Tensor counts, Tensor? groups, Tensor values) -> Tensor",
                         _cvar_backward_kernel, lambda grad, weights, counts, groups, values: torch.empty_like(values))
register_double_backward(cvar_backward, *linear_in_grad("cvar_backward"))


class _DistributedCVaR(torch.autograd.Function):
    """CVaR of the values of all ranks of ``group``; each rank gets the gradient of its own
    values, from the registered ``cvar_backward`` through :func:`cvar_grad`."""

    @staticmethod
    def forward(ctx, values, groups, num_groups, alpha, group):
        impl = device_kernels(values.device)
        if groups is None:
            acc = _acc(values.dtype)
            sizes = [torch.zeros(1, dtype=torch.int64, device=values.device) for _ in range(dist.get_world_size(group))]
            dist.all_gather(sizes, torch.tensor([values.numel()], device=values.device), group=group)
            sizes = [int(s) for s in sizes]
            padded = values.new_zeros(max(sizes), dtype=acc)
            padded[: values.numel()] = values
            gathered = [torch.empty_like(padded) for _ in sizes]
            dist.all_gather(gathered, padded, group=group)
            loss, w_all = impl.cvar_tail(torch.cat([g[:s] for g, s in zip(gathered, sizes)]), None, alpha)
            start = sum(sizes[: dist.get_rank(group)])
            w, counts = w_all[start: start + values.numel()].contiguous(), values.new_empty(0, dtype=torch.int64)
        else:
            loss, w, counts = cvar_forward(impl, values, groups, num_groups, alpha,
                                           all_reduce=lambda t: dist.all_reduce(t, group=group))
        ctx.save_for_backward(values, groups, w, counts)
        ctx.triton_on_cpu = impl is backends.TRITON and values.device.type == "cpu"
        return loss

    @staticmethod
    def backward(ctx, grad):
        values, groups, w, counts = ctx.saved_tensors
        with dispatch_context("triton" if ctx.triton_on_cpu else None, grad.device):
            return cvar_backward(grad.contiguous(), w, counts, groups, values), None, None, None, None


def cvar(values: Tensor, alpha: float, groups: Optional[Tensor] = None, num_groups: Optional[int] = None, *,
         process_group=None, backend: Optional[str] = None) -> Tensor:
    """Upper-tail CVaR: the mean of the worst ``alpha`` share of the values, or of the group means.

    values: (N,) floating. alpha in (0, 1] (1 is the plain mean). groups: (N,) integer ids in
    [0, num_groups) (num_groups defaults to max id + 1, which reads the ids on the host);
    empty groups are ignored. Exact fractional boundary term, ties by lower index.
    process_group: a ``torch.distributed`` group: the CVaR of the values of all its ranks
    (a rank may then hold no values; with groups, all ranks pass the same num_groups).
    Returns a 0-d float32 tensor (float64 for float64 values).
    """
    alpha, groups, num_groups = check_cvar_args(values, alpha, groups, num_groups,
                                                allow_empty=process_group is not None)
    name = backends.resolve(backend, values.device)
    _check_group_ids(groups, num_groups, name)
    if process_group is not None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("process_group: torch.distributed is not initialized")
        if name == "reference":
            raise ValueError("process_group: needs a fused backend ('cpp' or 'triton'), got 'reference'")
        with dispatch_context(name, values.device):
            return _DistributedCVaR.apply(values, groups, num_groups, alpha, process_group)
    if name == "reference":
        return cvar_reference(values, alpha, None if groups is None else groups.long(), num_groups)
    with dispatch_context(name, values.device):
        loss, _, _ = cvar_op(values, groups, num_groups, alpha)
    return loss


def _cvar_dual_kernel(impl):
    def cvar_dual(values, eta, alpha):
        return tuple(impl.cvar_dual_forward(values, eta, alpha))

    return cvar_dual


def _cvar_dual_backward_kernel(impl):
    def cvar_dual_backward(grad, values, eta, alpha, above):
        return tuple(impl.cvar_dual_backward(grad, values, eta, alpha, above))

    return cvar_dual_backward


def _cvar_dual_fake(values, eta, alpha):
    acc = _acc(values.dtype)
    return values.new_empty((), dtype=acc), values.new_empty((), dtype=acc)


cvar_dual_op = KernelOp("cvar_dual", "(Tensor values, Tensor eta, float alpha) -> (Tensor, Tensor)",
                        _cvar_dual_kernel, _cvar_dual_fake)
cvar_dual_backward = KernelOp(
    "cvar_dual_backward", "(Tensor grad, Tensor values, Tensor eta, float alpha, Tensor above) -> (Tensor, Tensor)",
    _cvar_dual_backward_kernel, lambda grad, values, eta, alpha, above: (torch.empty_like(values), torch.empty_like(eta)))
register_double_backward(cvar_dual_backward, *linear_in_grad("cvar_dual_backward"))


def cvar_dual(values: Tensor, eta, alpha: float, *, backend: Optional[str] = None) -> Tensor:
    """Rockafellar-Uryasev CVaR: eta + (1/(alpha N)) sum_i max(values_i - eta, 0).

    Minimized over eta it equals :func:`cvar`; differentiable in values and in eta
    (a float, or a 0-d tensor that may require grad). For chunked or streaming use.
    """
    alpha = check_cvar_args(values, alpha, None, None)[0]
    if isinstance(eta, Tensor):
        checks.floating("eta", eta)
        if eta.numel() != 1:
            raise ValueError(f"eta: expected a scalar, got shape {tuple(eta.shape)}")
        checks.same_device([("values", values), ("eta", eta)])
    elif isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta: expected a float or a 0-d tensor, got {type(eta).__name__}")
    else:
        eta = torch.tensor(float(eta), dtype=_acc(values.dtype), device=values.device)
    name = backends.resolve(backend, values.device)
    if name == "reference":
        return cvar_dual_reference(values, eta.reshape(()), alpha)
    with dispatch_context(name, values.device):
        loss, _ = cvar_dual_op(values, eta.reshape(()), alpha)
    return loss


def metacam_cvar(features, weights, labels, alpha: float, groups: Optional[Tensor] = None,
                 num_groups: Optional[int] = None, *, process_group=None, backend: Optional[str] = None,
                 **cam_options) -> Tensor:
    """CVaR of the per-image CAM variance: the architecture disagreement of the worst-off
    images (or of the worst groups of images, with ``groups`` (B,)).

    Images outside the tail get an exactly zero feature gradient. ``cam_options`` are
    those of :func:`cam_variance` (out_size, relu, norm, eps).
    """
    check_alpha(alpha)
    v = cam_variance(features, weights, labels, reduction="none", backend=backend, **cam_options)
    return cvar(v, alpha, groups, num_groups, process_group=process_group, backend=backend)


class CVaR(nn.Module):
    """``nn.Module`` form of :func:`cvar`: ``CVaR(alpha)(values, groups=None)``."""

    def __init__(self, alpha: float, num_groups: Optional[int] = None, *, backend: Optional[str] = None):
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.num_groups, self.backend = num_groups, backend

    def forward(self, values: Tensor, groups: Optional[Tensor] = None) -> Tensor:
        num_groups = self.num_groups if groups is not None else None
        return cvar(values, self.alpha, groups, num_groups, backend=self.backend)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, num_groups={self.num_groups}"


# --- the plain-PyTorch reference ------------------------------------------------------------

def group_means(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Means L_j (n,) of the non-empty groups, in increasing group id."""
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, groups, values)
    counts = torch.bincount(groups, minlength=num_groups)
    nonempty = counts > 0
    return sums[nonempty] / counts[nonempty].to(values.dtype)


def cvar_reference(values: torch.Tensor, alpha: float, groups: Optional[torch.Tensor] = None,
         num_groups: Optional[int] = None) -> torch.Tensor:
    """Upper-tail CVaR: (1/a) (sum_{r<=f} L_(r) + (a - f) L_(f+1)), a = alpha n (at least 1: below
    1 the tail is the largest L alone), f = floor(a), L sorted descending with ties by lower index
    (docs/ops.md section 4)."""
    if groups is None:
        L = values
    else:
        L = group_means(values, groups, num_groups if num_groups is not None else int(groups.max()) + 1)
    n = L.numel()
    a = alpha * n
    if abs(a - round(a)) < 1e-9:
        a = float(round(a))
    a = max(a, 1.0)
    f = math.floor(a)
    top = torch.sort(L, descending=True, stable=True).values
    out = top[:f].sum() / a
    if f < n and a > f:
        out = out + (a - f) / a * top[f]
    return out


def cvar_dual_reference(values: torch.Tensor, eta, alpha: float) -> torch.Tensor:
    """Rockafellar-Uryasev form: eta + (1/(alpha N)) sum_i max(values_i - eta, 0)."""
    return eta + torch.relu(values - eta).sum() / (alpha * values.numel())


def metacam_cvar_reference(features, weights, labels, alpha: float, groups=None, num_groups=None, **cam_options):
    """CVaR over images (or groups) of the per-image CAM variance."""
    v = cam_variance_reference(features, weights, labels, reduction="none", **cam_options)
    return cvar_reference(v, alpha, groups, num_groups)
