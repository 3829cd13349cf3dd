"""Distillers: each a small class whose ``step()`` updates the synthetic set it owns.

- :class:`DM`: distribution matching (Zhao & Bilen 2023): mean embeddings of real and
  synthetic images of each class, under a freshly initialized network per step.
- :class:`DC`: gradient matching (Zhao et al. 2021) with DSA augmentation: the
  synthetic images' training gradient is matched to the real images', layer by layer.
- :class:`SRe2L`: the recover stage of SRe2L (Yin et al. 2023): cross-entropy on a
  frozen teacher plus matching of its BatchNorm statistics.

Every distiller takes ``metadd=MetaDDLoss(...)`` with ``metadd_weight`` (the MetaDD
term on the synthetic images) and ``robust_alpha``: robust-DD grouping, where each
real image joins the group of its nearest synthetic image (embedding space) and
the per-image matching losses enter as a CVaR over groups. ``state_dict`` /
``load_state_dict`` carry everything a resumed run needs. ``device=`` puts the
synthetic set and the networks on a device; the real data stays where it is and
each sampled batch is moved over.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import DEFAULT_STRATEGY, DiffAugment
from .ops.cvar import check_alpha, cvar
from .data import Dataset, class_batches
from .ops.nearest_centroid import nearest_centroid
from .metadd_loss import MetaDDLoss
from .models import ConvNet, get_model

__all__ = ["Distiller", "DM", "DC", "SRe2L", "DISTILLERS"]


class Distiller:
    """Owns the synthetic set ``images`` (classes * ipc, C, H, W) and its optimizer."""

    default_lr = 1.0

    def __init__(self, real: Dataset, ipc: int, *, lr: Optional[float] = None, batch_real: int = 128,
                 arch: str = "ConvNet", init: str = "real", metadd: Optional[MetaDDLoss] = None,
                 metadd_weight: float = 0.0, robust_alpha: Optional[float] = None,
                 augment: Optional[str] = DEFAULT_STRATEGY, seed: int = 0, device=None):
        if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
            raise ValueError(f"ipc: expected a positive int, got {ipc!r}")
        if init not in ("real", "noise"):
            raise ValueError(f"init: expected 'real' or 'noise', got {init!r}")
        if robust_alpha is not None:
            check_alpha(robust_alpha)
        if metadd_weight and metadd is None:
            raise ValueError("metadd: metadd_weight > 0 needs a MetaDDLoss")
        self.real, self.ipc, self.arch, self.batch_real = real, ipc, arch, batch_real
        self.device = torch.device(device) if device is not None else real.images.device
        self.metadd, self.metadd_weight, self.robust_alpha = metadd, metadd_weight, robust_alpha
        self.augment = DiffAugment(augment) if augment else None
        self.gen = torch.Generator().manual_seed(seed)
        self.by_class = class_batches(real)
        short = [c for c, idx in enumerate(self.by_class) if len(idx) < (ipc if init == "real" else 1)]
        if short:
            raise ValueError(f"ipc: classes {short} have fewer than {ipc} real images")
        self.labels = torch.arange(real.num_classes).repeat_interleave(ipc).to(self.device)
        if init == "real":
            pick = [idx[torch.randperm(len(idx), generator=self.gen)[:ipc]] for idx in self.by_class]
            images = real.images[torch.cat(pick)].clone()
        else:
            images = torch.randn(len(self.labels), *real.images.shape[1:], generator=self.gen)
        self.images = images.to(self.device).requires_grad_()
        self.optimizer = self._optimizer(lr if lr is not None else self.default_lr)
        self.iteration = 0

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.images], lr=lr, momentum=0.5)

    def _seed(self) -> int:
        return int(torch.randint(1 << 30, (1,), generator=self.gen))

    def _aug(self, x: Tensor, seed: int) -> Tensor:
        return self.augment(x, seed) if self.augment is not None else x

    def _real(self, c: int) -> Tensor:
        idx = self.by_class[c]
        batch = self.real.images[idx[torch.randperm(len(idx), generator=self.gen)[: self.batch_real]]]
        return batch.to(self.device, non_blocking=True)  # real data stays on the host; batches stream in

    def _syn(self, c: int) -> Tensor:
        return self.images[c * self.ipc: (c + 1) * self.ipc]

    def _fresh_net(self) -> nn.Module:
        torch.manual_seed(self._seed())
        return get_model(self.arch, self.real.channel, self.real.num_classes, self.real.im_size).to(self.device)

    def match_loss(self) -> Tensor:
        raise NotImplementedError

    def step(self) -> dict:
        """One update of the synthetic images; returns the loss terms as floats."""
        self.optimizer.zero_grad(set_to_none=True)
        terms = {"match": self.match_loss()}
        if self.metadd is not None and self.metadd_weight:
            terms["metadd"] = self.metadd(self.images, self.labels)
        total = terms["match"] + self.metadd_weight * terms.get("metadd", 0.0)
        total.backward()
        self.optimizer.step()
        self.iteration += 1
        return {k: float(v.detach()) for k, v in terms.items()}

    def state_dict(self) -> dict:
        return {"images": self.images.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "iteration": self.iteration, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = state["iteration"]
        self.gen.set_state(state["gen"])


class DM(Distiller):
    """Distribution matching: || mean embed(real_c) - mean embed(syn_c) ||^2 summed over classes.
    With robust_alpha: the CVaR over groups of || embed(real_i) - mean embed(syn_c) ||^2, whose
    alpha = 1 gradient is DM's."""

    def _class_embeddings(self):
        """(class, real embeddings (detached), synthetic embeddings) of each class under one
        fresh network, each class with its own augmentation seed."""
        net = self._fresh_net().train()
        net.requires_grad_(False)
        for c in range(self.real.num_classes):
            seed = self._seed()
            yield c, net.embed(self._aug(self._real(c), seed)).detach(), net.embed(self._aug(self._syn(c), seed))

    @staticmethod
    def _robust_terms(e_real: Tensor, e_syn: Tensor) -> tuple:
        """Per-real-image losses and their groups (the nearest synthetic image of the class)."""
        per_real = ((e_real - e_syn.mean(0)) ** 2).sum(1)
        return per_real, nearest_centroid(e_real.detach(), e_syn.detach())[0]

    def match_loss(self) -> Tensor:
        loss = 0.0
        for _, e_real, e_syn in self._class_embeddings():
            if self.robust_alpha is None:
                loss = loss + ((e_real.mean(0) - e_syn.mean(0)) ** 2).sum()
            else:
                per_real, groups = self._robust_terms(e_real, e_syn)
                loss = loss + cvar(per_real, self.robust_alpha, groups, self.ipc)
        return loss

    def group_losses(self) -> tuple:
        """(values, groups) of one step for a CVaR over all classes at once: the per-real-image
        robust-DD losses of every class, with group ids in [0, classes * ipc) (class c's
        synthetic images are groups c * ipc ...). Draws the same randomness as a step."""
        values, groups = [], []
        for c, e_real, e_syn in self._class_embeddings():
            v, g = self._robust_terms(e_real, e_syn)
            values.append(v)
            groups.append(g + c * self.ipc)
        return torch.cat(values), torch.cat(groups)


def _grad_distance(g_syn, g_real) -> Tensor:
    """DC's layer-wise distance: sum over output units of 1 - cos(g_syn, g_real) (biases skipped)."""
    total = 0.0
    for gs, gr in zip(g_syn, g_real):
        if gs.dim() == 1:
            continue
        gs, gr = gs.flatten(1), gr.flatten(1)
        total = total + (1 - F.cosine_similarity(gs, gr, dim=1, eps=1e-6)).sum()
    return total


class DC(Distiller):
    """Gradient matching with DSA. The network is re-initialized every ``outer_loop`` steps and
    trained ``inner_steps`` SGD steps on the synthetic set after each image update. With
    robust_alpha the real gradient is that of the CVaR over groups of the real images'
    cross-entropy."""

    default_lr = 0.1

    def __init__(self, real: Dataset, ipc: int, *, outer_loop: int = 10, inner_steps: int = 1,
                 lr_net: float = 0.01, **kw):
        super().__init__(real, ipc, **kw)
        self.outer_loop, self.inner_steps, self.lr_net = outer_loop, inner_steps, lr_net
        self.net: Optional[nn.Module] = None

    def match_loss(self) -> Tensor:
        if self.net is None or self.iteration % self.outer_loop == 0:
            self.net = self._fresh_net().train()
        params = [p for p in self.net.parameters()]
        loss = 0.0
        for c in range(self.real.num_classes):
            seed = self._seed()
            x_real = self._aug(self._real(c), seed)
            y_real = torch.full((x_real.shape[0],), c, dtype=torch.int64, device=self.device)
            logits = self.net(x_real)
            if self.robust_alpha is None:
                real_loss = F.cross_entropy(logits, y_real)
            else:
                with torch.no_grad():
                    groups = nearest_centroid(self.net.embed(x_real), self.net.embed(self._syn(c)))[0]
                real_loss = cvar(F.cross_entropy(logits, y_real, reduction="none"), self.robust_alpha, groups,
                                 self.ipc)
            g_real = [g.detach() for g in torch.autograd.grad(real_loss, params)]
            x_syn = self._aug(self._syn(c), seed)
            syn_loss = F.cross_entropy(self.net(x_syn), self.labels[c * self.ipc: (c + 1) * self.ipc])
            g_syn = torch.autograd.grad(syn_loss, params, create_graph=True)
            loss = loss + _grad_distance(g_syn, g_real)
        return loss

    def step(self) -> dict:
        out = super().step()
        opt = torch.optim.SGD(self.net.parameters(), lr=self.lr_net, momentum=0.5)
        x = self.images.detach()
        for _ in range(self.inner_steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(self.net(self._aug(x, self._seed())), self.labels).backward()
            opt.step()
        return out


class SRe2L(Distiller):
    """Recover: CE(teacher(x_syn), y) + r_bn * sum over BatchNorm layers of
    ||mu(x) - running_mean||_2 + ||var(x) - running_var||_2; Adam on the images.
    With robust_alpha: the CVaR over synthetic images of their cross-entropy."""

    default_lr = 0.05

    def __init__(self, real: Dataset, ipc: int, *, teacher: nn.Module, r_bn: float = 0.01, **kw):
        bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        if not bns:
            raise ValueError("teacher: SRe2L needs a network with BatchNorm2d layers")
        super().__init__(real, ipc, **kw)
        self.teacher, self.r_bn, self.bns = teacher.eval().requires_grad_(False).to(self.device), r_bn, bns

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.images], lr=lr, betas=(0.5, 0.9))

    def match_loss(self) -> Tensor:
        stats = []

        def hook(m, inputs, output):
            x = inputs[0]
            stats.append(torch.norm(x.mean(dim=(0, 2, 3)) - m.running_mean, 2)
                         + torch.norm(x.var(dim=(0, 2, 3), unbiased=False) - m.running_var, 2))

        hooks = [m.register_forward_hook(hook) for m in self.bns]
        try:
            logits = self.teacher(self._aug(self.images, self._seed()))
        finally:
            for h in hooks:
                h.remove()
        if self.robust_alpha is None:
            ce = F.cross_entropy(logits, self.labels)
        else:
            ce = cvar(F.cross_entropy(logits, self.labels, reduction="none"), self.robust_alpha)
        return ce + self.r_bn * sum(stats)


def bn_teacher(real: Dataset, *, epochs: int = 20, seed: int = 0) -> nn.Module:
    """A ConvNet with BatchNorm trained on the real data: SRe2L's teacher."""
    from .training import train_model

    torch.manual_seed(seed)
    net = ConvNet(real.channel, real.num_classes, norm="batchnorm", im_size=real.im_size)
    return train_model(net, real.images, real.labels, epochs=epochs, seed=seed)


DISTILLERS = {"dm": DM, "dc": DC, "sre2l": SRe2L}
