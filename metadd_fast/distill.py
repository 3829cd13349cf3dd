"""Distillers: each a small class whose ``step()`` updates the synthetic set it owns.

- :class:`DM`: distribution matching (Zhao & Bilen 2023): mean embeddings of real and
  synthetic images of each class, under a freshly initialized network per step.
- :class:`DC`: gradient matching (Zhao et al. 2021) with DSA augmentation: the
  synthetic images' training gradient is matched to the real images', layer by layer.
- :class:`SRe2L`: the recover stage of SRe2L (Yin et al. 2023): cross-entropy on a
  frozen teacher plus matching of its BatchNorm statistics.

Every distiller takes ``metadd=MetaDDLoss(...)`` with ``metadd_weight`` (the MetaDD
term on the synthetic images) and ``robust_alpha`` / ``robust_weight`` (robust DD,
docs/methods.md): every step, the real batch of each class is grouped by the nearest
synthetic image OF THAT CLASS in the step's embedding (DM: the step's fresh network; DC:
the network being matched; SRe2L: the teacher; ``embedding=`` overrides it), each group
gets a loss that depends on its own synthetic image, and the upper-tail CVaR over all
groups, times ``robust_weight * num_classes``, is added to the method's loss. So the
worst-covered groups pull their own synthetic image toward them.

One step is split so that a chunked engine can couple the robust CVaR across chunks and
ranks: :meth:`Distiller.loss_terms` (every weighted term but the robust CVaR), then
:meth:`Distiller.group_losses` (the CVaR's values and group ids), then
:meth:`Distiller.finish_step`. ``step()`` composes them. ``state_dict`` holds tensors and
plain containers only (RNG state as a uint8 tensor), for ``torch.load(weights_only=True)``.
``device=`` puts the synthetic set and the networks on a device; the real data stays where
it is and each sampled batch is moved over.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import argcheck as ac
from .augment import DEFAULT_STRATEGY, DiffAugment, check_strategy
from .ops.cvar import cvar
from .data import Dataset, class_batches
from .errors import first_line
from .ops.nearest_centroid import nearest_centroid
from .metadd_loss import MetaDDLoss
from .models import MODELS, ConvNet, get_model

__all__ = ["Distiller", "DM", "DC", "SRe2L", "DISTILLERS", "coverage_losses"]

Embedding = Callable[[Tensor], Tensor]


def coverage_losses(e_real: Tensor, e_syn: Tensor) -> tuple[Tensor, Tensor]:
    """Robust DD's per-real-image loss in an embedding: (values (n,), groups (n,) int64).

    e_real (n, D) (no gradient needed), e_syn (m, D) the embeddings of one class's synthetic
    images (with their graph). groups[i] = the nearest synthetic image of real image i;
    values[i] = ||e_real[i] - e_syn[groups[i]]||^2, so a group's mean is
    ||mean_g e_real - e_syn[g]||^2 plus the group's scatter (constant in the synthetic images)
    and its gradient moves synthetic image g alone, toward its group's mean embedding."""
    groups = nearest_centroid(e_real.detach().float(), e_syn.detach().float())[0]
    return ((e_real.detach() - e_syn[groups]) ** 2).sum(1), groups


def _coverage_groups(pairs: list, ipc: int, robust_groups: str) -> tuple[Tensor, Tensor]:
    """:func:`coverage_losses` over classes: ``pairs`` [(e_real (n_c, D), e_syn (ipc, D))] per
    class in order. "class": each real image's group is the nearest synthetic image of its
    class; "all": of any class. Returns (values (sum n_c,), group ids in [0, classes * ipc))."""
    if robust_groups == "all":
        return coverage_losses(torch.cat([r for r, _ in pairs]), torch.cat([s for _, s in pairs]))
    values, groups = [], []
    for c, (e_real, e_syn) in enumerate(pairs):
        v, g = coverage_losses(e_real, e_syn)
        values.append(v)
        groups.append(g + c * ipc)
    return torch.cat(values), torch.cat(groups)


class Distiller:
    """Owns the synthetic set ``images`` (classes * ipc, C, H, W) and its optimizer.

    robust_alpha: None (no robust DD) or the CVaR tail fraction in (0, 1]; robust_weight:
    the robust term is ``robust_weight * num_classes * cvar(values, robust_alpha, groups,
    num_classes * ipc)`` (``robust_scale`` times the CVaR), added to the method's loss.
    embedding: a callable images -> (B, D) features used for robust DD's grouping and
    coverage losses instead of the method's own network (frozen if an nn.Module).
    robust_groups: "class" (each real image joins the nearest synthetic image of its own
    class) or "all" (the nearest synthetic image of any class, as the public Robust DD code's
    ``Cluster_Strategy.query``; the engine allows it only with one chunk of every class). The
    group ids are the synthetic images' indices, c * ipc + j, either way.
    """

    default_lr = 1.0
    _reads_real = True  # whether match_loss() reads real images (SRe2L's does not)

    def __init__(self, real: Dataset, ipc: int, *, lr: Optional[float] = None, batch_real: int = 128,
                 arch: str = "ConvNet", init: str = "real", metadd: Optional[MetaDDLoss] = None,
                 metadd_weight: float = 0.0, robust_alpha: Optional[float] = None, robust_weight: float = 1.0,
                 embedding: Optional[Embedding] = None, augment: Optional[str] = DEFAULT_STRATEGY, seed: int = 0,
                 device=None, label_offset: int = 0, robust_groups: str = "class"):
        self._check_args(real, ipc, lr, batch_real, arch, init, metadd, metadd_weight, robust_alpha, robust_weight,
                         embedding, augment, seed, device, label_offset)
        self.robust_groups = ac.choice("robust_groups", robust_groups, ("class", "all"))
        self.real, self.ipc, self.arch, self.batch_real = real, ipc, arch, batch_real
        self.device = torch.device(device) if device is not None else real.images.device
        self.metadd, self.metadd_weight, self.robust_alpha = metadd, metadd_weight, robust_alpha
        self.robust_weight = float(robust_weight)
        if isinstance(embedding, nn.Module):
            embedding.requires_grad_(False)
        self.embedding = embedding
        self.augment = DiffAugment(augment) if augment else None
        self.gen = torch.Generator().manual_seed(seed)
        self.by_class = class_batches(real)
        self.labels = torch.arange(real.num_classes).repeat_interleave(ipc).to(self.device)
        # The labels the teacher and the MetaDD networks see: the chunked engine gives each
        # distiller a chunk of classes, whose class 0 is class ``label_offset`` of those networks.
        self.global_labels = self.labels + label_offset
        if init == "real":
            pick = [idx[torch.randperm(len(idx), generator=self.gen)[:ipc]] for idx in self.by_class]
            images = real.take(torch.cat(pick)).clone()
        else:
            images = torch.randn(len(self.labels), *real.images.shape[1:], generator=self.gen)
        self.images = images.to(self.device).requires_grad_()
        self.optimizer = self._optimizer(lr if lr is not None else self.default_lr)
        self.iteration = 0
        self._ctx: tuple = (-1, None)  # (iteration, that step's network, real batches and seeds)

    # ---- argument checks (docs/api_checks.md) -----------------------------------------------

    def _check_args(self, real, ipc, lr, batch_real, arch, init, metadd, metadd_weight, robust_alpha,
                    robust_weight, embedding, augment, seed, device, label_offset) -> None:
        ac.dataset("real", real)
        ac.positive_int("ipc", ipc)
        ac.optional(ac.positive_float, "lr", lr)
        ac.positive_int("batch_real", batch_real)
        ac.choice("arch", arch, tuple(MODELS))
        ac.choice("init", init, ("real", "noise"))
        ac.nonnegative_float("metadd_weight", metadd_weight)
        if metadd is not None:
            ac.instance("metadd", metadd, MetaDDLoss, "None or a MetaDDLoss")
            if not metadd_weight:
                raise ac.InputError("metadd: has no effect with metadd_weight=0; give metadd_weight > 0 or leave "
                                    "metadd out")
        elif metadd_weight:
            raise ac.InputError("metadd: metadd_weight > 0 needs a MetaDDLoss")
        ac.optional(ac.fraction, "robust_alpha", robust_alpha)
        ac.positive_float("robust_weight", robust_weight)
        if robust_alpha is None:
            ac.no_effect("robust_weight", robust_weight, 1.0, "without robust_alpha")
        if embedding is not None:
            ac.function("embedding", embedding, "a callable images -> features")
            if robust_alpha is None and not self.embedding_matches:
                raise ac.InputError(f"embedding: has no effect without robust_alpha ({type(self).__name__} groups "
                                    f"real images in it for robust DD only)")
        if augment is not None:
            check_strategy("augment", augment)
        ac.seed("seed", seed)
        ac.device("device", device)
        ac.nonnegative_int("label_offset", label_offset)
        # Real images a class needs: ipc to start from; one for batches (noise init: SRe2L's recover
        # without robust DD reads none, so a chunked run need not decode any).
        need = ipc if init == "real" else 1 if robust_alpha is not None or self._reads_real else 0
        counts = torch.bincount(real.labels.cpu(), minlength=real.num_classes)
        short = (counts < need).nonzero().flatten().tolist()
        if short:
            raise ac.InputError(f"ipc: classes {short[:10]}{'...' if len(short) > 10 else ''} of real have fewer "
                                f"than {need} images")

    embedding_matches = False  # whether the method's own loss runs in ``embedding`` too (DM), not only robust DD

    # ---- helpers ------------------------------------------------------------------------

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.images], lr=lr, momentum=0.5)

    def _seed(self) -> int:
        return int(torch.randint(1 << 30, (1,), generator=self.gen))

    def _aug(self, x: Tensor, seed: int) -> Tensor:
        return self.augment(x, seed) if self.augment is not None else x

    def _real(self, c: int) -> Tensor:
        idx = self.by_class[c]
        batch = self.real.take(idx[torch.randperm(len(idx), generator=self.gen)[: self.batch_real]])
        return batch.to(self.device, non_blocking=True)  # real data stays on the host; batches stream in

    def _syn(self, c: int) -> Tensor:
        return self.images[c * self.ipc: (c + 1) * self.ipc]

    def _fresh_net(self) -> nn.Module:
        torch.manual_seed(self._seed())
        return get_model(self.arch, self.real.channel, self.real.num_classes, self.real.im_size).to(self.device)

    def _context(self) -> dict:
        """The step's random draws (network, real batches, augmentation seeds), made once per
        step on first use, so loss_terms() and group_losses() see the same ones."""
        if self._ctx[0] != self.iteration:
            self._ctx = (self.iteration, self._new_context())
        return self._ctx[1]

    def _new_context(self) -> dict:
        raise NotImplementedError

    @property
    def num_groups(self) -> int:
        """Robust DD's groups: one per synthetic image (class c's image j is group c * ipc + j)."""
        return self.real.num_classes * self.ipc

    @property
    def robust_scale(self) -> float:
        """The CVaR's factor in the step's loss: robust_weight * num_classes (so that at IPC 1 and
        alpha 1 the robust term has the scale of a sum over classes, like the methods' losses)."""
        return self.robust_weight * self.real.num_classes

    # ---- one step, in parts ---------------------------------------------------------------

    def match_loss(self) -> Tensor:
        """The method's own loss on the synthetic images (DM, DC or SRe2L's objective)."""
        raise NotImplementedError

    def loss_terms(self) -> dict:
        """Every weighted scalar term of the step except robust DD's CVaR: {"match", ["metadd"]}."""
        terms = {"match": self.match_loss()}
        if self.metadd is not None and self.metadd_weight:
            terms["metadd"] = self.metadd_weight * self.metadd(self.images, self.global_labels)
        return terms

    def group_losses(self) -> tuple[Tensor, Tensor]:
        """Robust DD's (values (n,), groups (n,) int64 in [0, num_groups)) of this step; the robust
        term is ``robust_scale * cvar(values, robust_alpha, groups, num_groups)``."""
        raise NotImplementedError

    def robust_loss(self) -> Tensor:
        values, groups = self.group_losses()
        return self.robust_scale * cvar(values, self.robust_alpha, groups, self.num_groups)

    def _update_networks(self) -> None:
        """Per-step network update after the image update (DC's inner loop)."""

    def finish_step(self) -> None:
        """Optimizer step on the images, per-step network update, iteration += 1."""
        self.optimizer.step()
        self._update_networks()
        self.iteration += 1
        self._ctx = (-1, None)  # frees the step's graph

    def loss(self) -> dict:
        """The step's terms (tensors): loss_terms() and, with robust_alpha, "robust"."""
        terms = self.loss_terms()
        if self.robust_alpha is not None:
            terms["robust"] = self.robust_loss()
        return terms

    def step(self) -> dict:
        """One update of the synthetic images; returns the loss terms as floats."""
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.loss()
        sum(terms.values()).backward()
        self.finish_step()
        return {k: float(v.detach()) for k, v in terms.items()}

    # ---- resuming ---------------------------------------------------------------------------

    state_keys = ("images", "optimizer", "iteration", "gen")

    def state_dict(self) -> dict:
        return {"images": self.images.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "iteration": self.iteration, "gen": self.gen.get_state()}

    def _check_state(self, state) -> None:
        """InputError naming ``state`` unless it is a :meth:`state_dict` of this distiller's kind,
        classes, IPC and image shape: checked before anything is loaded."""
        ac.instance("state", state, dict, f"a {type(self).__name__}.state_dict()")
        if set(state) != set(self.state_keys):
            raise ac.InputError(f"state: expected a {type(self).__name__}.state_dict() (keys "
                                f"{', '.join(self.state_keys)}), got keys {', '.join(map(str, state)) or 'none'}")
        images = state["images"]
        ac.tensor("state['images']", images)
        if images.shape != self.images.shape:
            raise ac.InputError(f"state: images of shape {tuple(images.shape)}, expected {tuple(self.images.shape)} "
                                f"({self.real.num_classes} classes x ipc {self.ipc}): a state of another run")
        ac.nonnegative_int("state['iteration']", state["iteration"])
        gen = self.gen.get_state()
        ac.tensor("state['gen']", state["gen"], dtype=torch.uint8, shape=tuple(gen.shape))
        opt = state["optimizer"]
        own = self.optimizer.state_dict()
        groups = opt.get("param_groups") if isinstance(opt, dict) else None
        if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict) or \
                set(groups[0]) != set(own["param_groups"][0]):
            raise ac.InputError(f"state: optimizer state of another method; {type(self).__name__} uses "
                                f"{type(self.optimizer).__name__}")

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; InputError naming ``state`` if it is not one of this
        distiller's (another method, IPC, class count or image shape)."""
        self._check_state(state)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise ac.InputError(f"state: optimizer state does not fit ({first_line(err)})") from err
        with torch.no_grad():
            self.images.copy_(state["images"])
        self.iteration = state["iteration"]
        self.gen.set_state(state["gen"])
        self._ctx = (-1, None)


class DM(Distiller):
    """Distribution matching: sum_c || mean e(real_c) - mean e(syn_c) ||^2 under a fresh network
    e per step (or the fixed ``embedding``), with one augmentation seed per class.

    Robust DD: each real image of class c joins the group of its nearest synthetic image of
    class c in e (recomputed every step, under that step's network and augmentation); its
    value is its squared embedding distance to that image (:func:`coverage_losses`). The CVaR
    over groups sends each synthetic image of a badly covered group toward that group's
    mean embedding. At alpha = 1 it is the mean over non-empty groups of their mean
    distance, a Lloyd (k-means) pull of every image toward its cell; it equals DM's loss plus
    a constant only at IPC 1 (one group per class)."""

    embedding_matches = True

    def _new_context(self) -> dict:
        if self.embedding is not None:
            embed = self.embedding
        else:
            net = self._fresh_net().train()
            net.requires_grad_(False)
            embed = net.embed
        classes = []
        for c in range(self.real.num_classes):
            seed = self._seed()
            with torch.no_grad():
                e_real = embed(self._aug(self._real(c), seed)).flatten(1)
            classes.append((seed, e_real))
        return {"embed": embed, "classes": classes}

    def _class_embeddings(self):
        """(real embeddings (detached), synthetic embeddings (with graph)) of each class."""
        ctx = self._context()
        if "syn" not in ctx:
            ctx["syn"] = [ctx["embed"](self._aug(self._syn(c), seed)).flatten(1)
                          for c, (seed, _) in enumerate(ctx["classes"])]
        return [(e_real, e_syn) for (_, e_real), e_syn in zip(ctx["classes"], ctx["syn"])]

    def match_loss(self) -> Tensor:
        return sum(((e_real.mean(0) - e_syn.mean(0)) ** 2).sum() for e_real, e_syn in self._class_embeddings())

    def group_losses(self) -> tuple[Tensor, Tensor]:
        return _coverage_groups(self._class_embeddings(), self.ipc, self.robust_groups)


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
    """Gradient matching with DSA: sum_c D(grad CE(net(syn_c)), grad CE(net(real_c))), D the
    layer-wise cosine distance. The network is re-initialized every ``outer_loop`` steps and
    trained ``inner_steps`` SGD steps on the synthetic set after each image update.

    Robust DD: each real image of class c joins the group of its nearest synthetic image of
    class c in the network's embedding (every step, under the network being matched, or
    ``embedding``); a group's value is D(grad CE(net(s_g)), grad CE(net(real images of g))),
    the gradient match of that one synthetic image to its own group. At IPC 1 and alpha = 1
    the robust term equals DC's loss (times robust_weight)."""

    default_lr = 0.1

    def __init__(self, real: Dataset, ipc: int, *, outer_loop: int = 10, inner_steps: int = 1,
                 lr_net: float = 0.01, **kw):
        ac.positive_int("outer_loop", outer_loop)
        ac.nonnegative_int("inner_steps", inner_steps)
        ac.positive_float("lr_net", lr_net)
        if not inner_steps:
            ac.no_effect("lr_net", lr_net, 0.01, "with inner_steps=0 (the network is not trained)")
        super().__init__(real, ipc, **kw)
        self.outer_loop, self.inner_steps, self.lr_net = outer_loop, inner_steps, lr_net
        self.net: Optional[nn.Module] = None

    def _new_context(self) -> dict:
        if self.net is None or self.iteration % self.outer_loop == 0:
            self.net = self._fresh_net().train()
        classes = []
        for c in range(self.real.num_classes):
            seed = self._seed()
            classes.append((seed, self._aug(self._real(c), seed)))
        return {"classes": classes}

    def _grads(self, x: Tensor, c, create_graph: bool) -> tuple:
        """Gradients of CE(net(x), c) over the network's parameters; c a class or labels (n,)."""
        params = list(self.net.parameters())
        y = c if isinstance(c, Tensor) else torch.full((x.shape[0],), c, dtype=torch.int64, device=self.device)
        return torch.autograd.grad(F.cross_entropy(self.net(x), y), params, create_graph=create_graph)

    def match_loss(self) -> Tensor:
        loss = 0.0
        for c, (seed, x_real) in enumerate(self._context()["classes"]):
            g_real = [g.detach() for g in self._grads(x_real, c, False)]
            loss = loss + _grad_distance(self._grads(self._aug(self._syn(c), seed), c, True), g_real)
        return loss

    def group_losses(self) -> tuple[Tensor, Tensor]:
        embed = self.embedding if self.embedding is not None else self.net.embed
        values, groups = [], []
        per_class = [(x_real, self._aug(self._syn(c), seed), c)
                     for c, (seed, x_real) in enumerate(self._context()["classes"])]
        if self.robust_groups == "all":  # one pool: real images of every class, every synthetic image
            y_real = torch.cat([torch.full((len(r),), c, dtype=torch.int64, device=self.device)
                                for r, _, c in per_class])
            per_class = [(torch.cat([r for r, _, _ in per_class]), torch.cat([s for _, s, _ in per_class]), y_real)]
        for x_real, x_syn, y_real in per_class:
            offset = 0 if isinstance(y_real, Tensor) else y_real * self.ipc
            with torch.no_grad():
                g = nearest_centroid(embed(x_real).flatten(1).float(), embed(x_syn).flatten(1).float())[0]
            for j in torch.unique(g).tolist():
                y = y_real[g == j] if isinstance(y_real, Tensor) else y_real
                g_real = [t.detach() for t in self._grads(x_real[g == j], y, False)]
                y_syn = self.labels[offset + j: offset + j + 1]
                values.append(_grad_distance(self._grads(x_syn[j: j + 1], y_syn, True), g_real))
                groups.append(offset + j)
        return torch.stack(values), torch.tensor(groups, dtype=torch.int64, device=self.device)

    def _update_networks(self) -> None:
        opt = torch.optim.SGD(self.net.parameters(), lr=self.lr_net, momentum=0.5)
        x = self.images.detach()
        for _ in range(self.inner_steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(self.net(self._aug(x, self._seed())), self.labels).backward()
            opt.step()

    state_keys = Distiller.state_keys + ("net",)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["net"] = None if self.net is None else {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state)
        net = None
        if state.get("net") is not None:
            net = get_model(self.arch, self.real.channel, self.real.num_classes, self.real.im_size).to(self.device)
            try:
                net.load_state_dict(state["net"])
            except (RuntimeError, TypeError, AttributeError) as err:
                raise ac.InputError(f"state: net does not fit {self.arch} for {self.real.num_classes} classes "
                                    f"({first_line(err)})") from err
            net.train()
        super().load_state_dict(state)
        self.net = net


class SRe2L(Distiller):
    """Recover: CE(teacher(x_syn), y) + r_bn * sum over BatchNorm layers of
    ||mu(x) - running_mean||_2 + ||var(x) - running_var||_2; Adam on the images.

    Robust DD (needs the real data at recover time, which SRe2L's recover does not use): the
    coverage losses of :class:`DM` in the frozen teacher's embedding (``teacher.embed`` or
    ``embedding=``): each real image of class c is grouped by its nearest synthetic image of
    class c, every step, under the step's augmentation."""

    default_lr = 0.05
    _reads_real = False

    def __init__(self, real: Dataset, ipc: int, *, teacher: nn.Module, r_bn: float = 0.01, **kw):
        ac.module("teacher", teacher)
        bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        if not bns:
            raise ac.InputError("teacher: SRe2L needs a network with BatchNorm2d layers")
        ac.nonnegative_float("r_bn", r_bn)
        super().__init__(real, ipc, **kw)
        self._check_teacher(teacher)
        if self.robust_alpha is not None and self.embedding is None and not callable(getattr(teacher, "embed", None)):
            raise ac.InputError(f"embedding: robust SRe2L groups real images in the teacher's embedding, and "
                             f"{type(teacher).__name__} has no .embed; pass embedding= (images -> features)")
        self.teacher, self.r_bn, self.bns = teacher.eval().requires_grad_(False).to(self.device), r_bn, bns

    def _check_teacher(self, teacher: nn.Module) -> None:
        """The teacher runs on one image of the real images' shape (zeros: a method that reads no
        real image has none to give; eval mode, no gradient) and has a logit for every global label."""
        was_training = teacher.training
        teacher.to(self.device)
        try:
            with torch.no_grad():
                logits = teacher.eval()(torch.zeros(1, *self.real.images.shape[1:], device=self.device))
        except (RuntimeError, ValueError, IndexError) as err:
            raise ac.InputError(f"teacher: {type(teacher).__name__} does not run on the real images of shape "
                                f"{tuple(self.real.images.shape[1:])} on {self.device} ({first_line(err)})") from err
        finally:
            teacher.train(was_training)
        need = int(self.global_labels.max()) + 1
        if logits.dim() != 2 or logits.shape[1] < need:
            raise ac.InputError(f"teacher: expected (1, >= {need}) logits for labels up to {need - 1} "
                                f"(label_offset {need - self.real.num_classes}), got shape {tuple(logits.shape)}")

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.images], lr=lr, betas=(0.5, 0.9))

    def _new_context(self) -> dict:
        return {"seed": self._seed()}

    def match_loss(self) -> Tensor:
        stats = []

        def hook(m, inputs, output):
            x = inputs[0]
            stats.append(torch.norm(x.mean(dim=(0, 2, 3)) - m.running_mean, 2)
                         + torch.norm(x.var(dim=(0, 2, 3), unbiased=False) - m.running_var, 2))

        hooks = [m.register_forward_hook(hook) for m in self.bns]
        try:
            logits = self.teacher(self._aug(self.images, self._context()["seed"]))
        finally:
            for h in hooks:
                h.remove()
        return F.cross_entropy(logits, self.global_labels) + self.r_bn * sum(stats)

    def group_losses(self) -> tuple[Tensor, Tensor]:
        seed = self._context()["seed"]
        embed = self.embedding if self.embedding is not None else self.teacher.embed
        pairs = []
        for c in range(self.real.num_classes):
            with torch.no_grad():
                e_real = embed(self._aug(self._real(c), seed)).flatten(1)
            pairs.append((e_real, embed(self._aug(self._syn(c), seed)).flatten(1)))
        return _coverage_groups(pairs, self.ipc, self.robust_groups)


def bn_teacher(real: Dataset, *, epochs: int = 20, seed: int = 0) -> nn.Module:
    """A ConvNet with BatchNorm trained on the real data: SRe2L's teacher."""
    from .training import train_model

    torch.manual_seed(seed)
    net = ConvNet(real.channel, real.num_classes, norm="batchnorm", im_size=real.im_size)
    return train_model(net, real.images, real.labels, epochs=epochs, seed=seed)


DISTILLERS = {"dm": DM, "dc": DC, "sre2l": SRe2L}
