"""Large-IPC runs of DM, DC and SRe2L (with MetaDD and robust DD): class chunks, a
memory-mapped synthetic set, class sharding across ranks, cross-rank robust-DD CVaR, and
per-chunk checkpoints that survive ``kill -9``.

This is the one runner behind ``metadd-fast distill``: without ``classes_per_chunk`` (None)
the run is one chunk holding every class, with the same config, resume format and network
cache.

The real data is a class-indexed source (:mod:`metadd_fast.sources`): only its index is held,
and a chunk reads the images of its own classes when it starts (as uint8 pixels for decoded
image folders, normalized per batch; in-memory sources as they are) and drops them when it
ends. The synthetic set (classes * ipc, C, H, W) float32 lives in ``<out>/synthetic.f32``, a
memory-mapped file, so host and device memory depend on the chunk, not on the number of
classes or the IPC: only the chunk being optimized is on the device (``device=``), its real
images stay on the host (pinned with ``pin_memory=True``, so batches copy asynchronously).
Classes are optimized ``classes_per_chunk`` at a time, each chunk by its own distiller.
Every network is loaded (weights files read and fitted first) before the first image is
decoded, and SRe2L without robust DD reads no real image (its recover starts from noise).

What a chunk means per method:

- SRe2L: the teacher is trained on all classes; a chunk's images are recovered with the
  teacher's full softmax over every class (labels are global), so chunks are
  independent (with robust DD, coupled only through the CVaR of a round, below).
- DM: per-class matching under fresh random networks; chunks are independent.
- DC: the network whose gradients are matched is built and trained (inner loop) on the
  chunk's classes only: a classifier over ``classes_per_chunk`` classes, not over all
  of them. Gradient matching is per class, but the network it runs through is the
  chunk's, so the result depends on ``classes_per_chunk`` (like DC's class-batched
  variants); use one chunk for DC's original form.

MetaDD (``metadd_weight`` > 0): the K networks (``metadd_models``) and the SRe2L
``teacher`` are named by specs (:mod:`metadd_fast.model_sources`: a state_dict file, a
torchvision/timm name with a local file, or a zoo network trained on the real data and
cached in ``<out>/models/``); each rank loads them once and every chunk uses them with
its global labels.

With ``robust_alpha`` (robust DD, docs/methods.md), a step's loss is every chunk's
``loss_terms()`` plus ``robust_weight * (classes of the round) * CVaR`` over the groups (real
images grouped by their nearest synthetic image of their class, or with ``robust_groups="all"``
of any class; the distillers' ``group_losses()``) of ``cvar_chunks`` chunks optimized together:
one "round". Groups over all classes need every class in one chunk: ``robust_groups="all"``
with more than one chunk is refused (a chunk sees only its own classes' synthetic images).
In a ``torch.distributed`` run (gloo on CPU, NCCL on GPU;
``torchrun`` sets the environment) the chunks of a round are split over the ranks and
the CVaR goes through the ``process_group=`` path of :func:`metadd_fast.cvar`, so every
rank's tail is the tail of the whole round. Otherwise (no robust_alpha) chunks
are independent and rank r takes chunks r, r + world, ... Either way the result depends
only on the configuration and the seed, not on the number of ranks.

With ``robust_alpha``, each finished chunk also groups ALL real images of its classes (not
only the sampled batches): each joins its nearest final synthetic image of its class
(:func:`metadd_fast.grouping.class_nearest_groups`, streamed a class at a time, so memory
does not grow with the real set), or with ``robust_groups="all"`` of any class
(:func:`metadd_fast.grouping.nearest_groups`, streamed a batch at a time). ``<out>/groups.pt``
holds ``group_sizes`` (classes * ipc,): real images per synthetic image; a 0 is a synthetic
image that represents no real one.

Each finished chunk is marked by an atomically written ``chunks/chunk_XXXXX.pt``; after
a barrier rank 0 writes the merged ``synthetic.pt`` and ``synthetic.png`` (with MetaDD
``cams.png``). With ``checkpoint_every``, each rank also saves the round it is running every
that many steps (``state.pt``, rank r > 0 ``state.rank<r>.pt``), so a killed run restarted
with the same command skips finished rounds and resumes the one that was running from its
last checkpoint (without it, redoes that round). ``run.json`` holds the run's identity. A
checkpoint from another run, or a corrupt or crafted one, is refused with a message naming
the file. With ``zca``, the run distills in regularised-ZCA space (:mod:`metadd_fast.zca`):
the source is wrapped in a :class:`~metadd_fast.sources.WhitenedSource`, whose ZCA is fitted
on every real image in one streamed pass (a batch at a time, after the networks with weights
files are loaded) and which whitens what each chunk reads; images of at most 64x64x3 values
(the D x D covariance). The run saves the transform in ``zca.pt`` and the synthetic set
un-whitened.

Zoo networks without a weights file are trained on the source a batch at a time
(:meth:`~metadd_fast.sources.Source.rows`: an image folder decodes only the batch's files,
every image once an epoch), so their training holds no more than a batch either. Nothing is
written into ``out`` (run files, nor the source's index: ``save_index()``) before every
network with a weights file is loaded and every check has passed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import argcheck, ranks, runinfo
from .ops.cvar import cvar
from .data import Dataset, class_batches
from .distill import DISTILLERS
from .errors import InputError, first_line
from .grouping import class_nearest_groups, nearest_groups
from .metadd_loss import MetaDDLoss
from .precision import PRECISIONS
from .model_sources import file_digest, load_model, parse_spec
from .models import MODELS, get_model
from .results import atomic_save, atomic_write_json, load_checkpoint, load_json_object, save_synthetic
from .run_figures import save_cams, save_synthetic_grid
from .sources import TensorSource, WhitenedSource
from .zca import ZCA

__all__ = ["EngineConfig", "SyntheticStore", "run_chunked"]

RUN_ONLY = ("device", "pin_memory", "checkpoint_every")  # where and how a run executes, not what it computes


@dataclasses.dataclass
class EngineConfig:
    """A chunked run. ``robust_alpha``: robust-DD CVaR tail (None: off) over the groups of a
    round of ``cvar_chunks`` chunks, with weight ``robust_weight`` (as the distillers');
    ``robust_groups``: "class" (each real image joins the nearest synthetic image of its class)
    or "all" (of any class, as the public code; one chunk only). ``metadd_weight``, ``metadd_models``
    (>= 2 spec strings), ``metadd_alpha``, ``metadd_precision``: the MetaDD term; ``teacher``: SRe2L's teacher
    spec; ``pretrain_epochs``: for zoo specs without weights. ``classes_per_chunk`` None: one
    chunk of every class. ``zca``: distill in ZCA space. ``checkpoint_every``: steps between
    checkpoints within a round (None: a round is redone if killed). ``device``,
    ``pin_memory`` and ``checkpoint_every`` say where and how the run executes and are not
    part of the run's identity (a run may resume elsewhere)."""

    method: str = "dm"
    ipc: int = 10
    iterations: int = 20
    classes_per_chunk: Optional[int] = 10
    batch_real: int = 64
    arch: str = "ConvNet"
    lr: Optional[float] = None
    seed: int = 0
    robust_alpha: Optional[float] = None
    robust_weight: float = 1.0
    robust_groups: str = "class"
    cvar_chunks: int = 1
    metadd_weight: float = 0.0
    metadd_models: tuple = ()
    metadd_alpha: Optional[float] = None
    metadd_precision: str = "fp32"
    teacher: Optional[str] = None
    pretrain_epochs: int = 15
    zca: bool = False
    checkpoint_every: Optional[int] = None
    device: Optional[str] = None
    pin_memory: bool = False

    def specs(self) -> list:
        """(flag, ModelSpec) of every network the run loads: the teacher, then the MetaDD networks."""
        out = [("teacher", parse_spec(self.teacher, "teacher"))] if self.teacher is not None else []
        return out + [("metadd_models", parse_spec(m, "metadd_models")) for m in self.metadd_models]

    def identity(self) -> dict:
        """What the result depends on, as JSON values: every field but RUN_ONLY's."""
        return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k not in RUN_ONLY}))

    def digest(self, source_key: str) -> str:
        weights = [file_digest(spec.path) for _, spec in self.specs() if spec.path is not None]
        blob = json.dumps({"config": self.identity(), "source": source_key, "weights": weights}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def coupled(self) -> bool:
        """Whether the robust CVaR couples the chunks of a round (every method's robust term is a
        CVaR over its ``group_losses()``)."""
        return self.robust_alpha is not None

    def check(self, world: int) -> None:
        """ValueError/TypeError naming the field that is wrong, for a run over ``world`` ranks."""
        argcheck.positive_int("world", world)
        argcheck.seed("seed", self.seed)
        argcheck.boolean("pin_memory", self.pin_memory)
        argcheck.device("device", self.device)
        argcheck.choice("robust_groups", self.robust_groups, ("class", "all"))
        if self.robust_alpha is None:
            argcheck.no_effect("robust_weight", self.robust_weight, 1.0, "without robust_alpha")
            argcheck.no_effect("robust_groups", self.robust_groups, "class", "without robust_alpha")
        if not isinstance(self.metadd_models, (tuple, list)) or not all(isinstance(m, str) for m in self.metadd_models):
            raise argcheck.type_error("metadd_models", "a tuple of spec strings", self.metadd_models)
        if self.teacher is not None:
            argcheck.string("teacher", self.teacher, "None or a spec string")
        if self.method not in DISTILLERS:
            raise ValueError(f"method: expected one of {', '.join(DISTILLERS)}, got {self.method!r}")
        for name in ("ipc", "iterations", "classes_per_chunk", "batch_real", "cvar_chunks", "pretrain_epochs",
                     "checkpoint_every"):
            if getattr(self, name) is None and name in ("classes_per_chunk", "checkpoint_every"):
                continue
            argcheck.positive_int(name, getattr(self, name))
        argcheck.boolean("zca", self.zca)
        if isinstance(self.metadd_weight, bool) or not isinstance(self.metadd_weight, (int, float)) or \
                not 0 <= self.metadd_weight < math.inf:
            raise ValueError(f"metadd_weight: expected a finite float >= 0, got {self.metadd_weight!r}")
        if isinstance(self.robust_weight, bool) or not isinstance(self.robust_weight, (int, float)) or \
                not 0 < self.robust_weight < math.inf:
            raise ValueError(f"robust_weight: expected a finite float > 0, got {self.robust_weight!r}")
        for name in ("robust_alpha", "metadd_alpha"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value <= 1):
                raise ValueError(f"{name}: expected None or a float in (0, 1], got {value!r}")
        if self.arch not in MODELS:
            raise ValueError(f"arch: expected one of {', '.join(MODELS)}, got {self.arch!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not 0 < self.lr < math.inf):
            raise ValueError(f"lr: expected None or a finite float > 0, got {self.lr!r}")
        if self.metadd_weight and len(self.metadd_models) < 2:
            raise ValueError(f"metadd_models: MetaDD needs at least 2 networks, got {len(self.metadd_models)}")
        if self.metadd_precision not in PRECISIONS:
            raise ValueError(f"metadd_precision: expected one of {', '.join(PRECISIONS)}, got {self.metadd_precision!r}")
        if not self.metadd_weight and (self.metadd_models or self.metadd_alpha is not None):
            raise ValueError("metadd_weight: metadd_models and metadd_alpha act only with metadd_weight > 0")
        if not self.metadd_weight and self.metadd_precision != "fp32":
            raise ValueError("metadd_precision: acts only with metadd_weight > 0")
        if (self.method == "sre2l") != (self.teacher is not None):
            raise ValueError("teacher: sre2l needs a teacher and only sre2l uses one, "
                             f"got method={self.method!r}, teacher={self.teacher!r}")
        self.specs()
        if self.cvar_chunks > 1 and not self.coupled():
            raise ValueError("cvar_chunks: coupling chunks needs robust_alpha")
        if self.coupled() and self.cvar_chunks > 1 and self.cvar_chunks % world:
                raise ValueError(f"cvar_chunks: the {self.cvar_chunks} chunks of a round cannot be split evenly "
                                 f"over {world} ranks; use a multiple of the world size")
        if self.pin_memory and torch.device(self.device or "cpu").type != "cuda":
            raise ValueError(f"pin_memory: pinned host memory serves a CUDA device, got device={self.device!r}")

    def check_classes(self, num_classes: int) -> None:
        """InputError naming ``robust_groups`` if the run over ``num_classes`` classes cannot group
        as asked: groups over every class ("all") need one chunk holding every class."""
        if self.robust_groups == "all" and (self.classes_per_chunk or num_classes) < num_classes:
            raise InputError(f"robust_groups: groups over every class need one chunk: drop classes_per_chunk "
                             f"(got {self.classes_per_chunk} for {num_classes} classes) or group per class ('class')")


class SyntheticStore:
    """The synthetic images in a float32 memory-mapped file; each write maps and unmaps it,
    so only the chunk in use is resident."""

    def __init__(self, path: str, num_images: int, image_shape: tuple):
        self.path, self.shape = path, (num_images, *image_shape)
        if not os.path.exists(path) or os.path.getsize(path) != int(np.prod(self.shape)) * 4:
            np.memmap(path, dtype=np.float32, mode="w+", shape=self.shape).flush()

    def write(self, start: int, images: torch.Tensor) -> None:
        mm = np.memmap(self.path, dtype=np.float32, mode="r+", shape=self.shape)
        mm[start:start + images.shape[0]] = images.detach().cpu().numpy()
        mm.flush()
        del mm

    def view(self) -> torch.Tensor:
        """The whole set as a tensor backed by the file (copy-on-write, nothing is copied): pages
        are read on access and can be evicted, so a set larger than RAM can still be saved."""
        return torch.from_numpy(np.memmap(self.path, dtype=np.float32, mode="c", shape=self.shape))


def _reads_real(cfg: EngineConfig) -> bool:
    """Whether the run reads real images: every method but SRe2L without robust DD."""
    return cfg.method != "sre2l" or cfg.robust_alpha is not None


def _chunk_real(source, classes: list, pin: bool, reads: bool = True) -> Dataset:
    """The real images of ``classes`` (labels 0.. in their order), read class by class into one
    tensor: uint8 pixels for a source that decodes (``class_pixels``; normalized per batch by
    :meth:`Dataset.take`), else its float images. ``reads`` False: no image (shape only).
    An in-memory source's every class (the one-chunk run) is its own Dataset, not a copy."""
    if reads and not pin and isinstance(source, TensorSource) and classes == list(range(source.num_classes)):
        return source.dataset()  # class c's rows in the same order as class_images(c): the same draws
    counts = [source.counts[c] for c in classes] if reads else [0] * len(classes)
    pixels = getattr(source, "class_pixels", None)
    images, start = None, 0
    for c, n in zip(classes, counts):
        if n == 0:
            continue
        x = pixels(c) if pixels is not None else source.class_images(c)
        if images is None:
            images = torch.empty((sum(counts), *x.shape[1:]), dtype=x.dtype, pin_memory=pin)
        images[start:start + n] = x
        start += n
        del x
    if images is None:
        images = torch.empty((0, *source.shape), dtype=torch.uint8)
    labels = torch.arange(len(classes)).repeat_interleave(torch.tensor(counts, dtype=torch.int64))
    return Dataset("chunk", images, labels, len(classes), tuple(source.mean), tuple(source.std))


@dataclasses.dataclass
class Networks:
    """What every chunk of a rank shares: SRe2L's teacher and the MetaDD loss (or None)."""

    teacher: Optional[torch.nn.Module] = None
    metadd: Optional[MetaDDLoss] = None


def _load_networks(cfg: EngineConfig, source, out: str) -> Networks:
    """The teacher and MetaDD networks on ``cfg.device``: those with a weights file first (so a
    bad file is reported before any image is read), then zoo specs without weights, trained on
    ``source`` a batch at a time and cached in ``<out>/models/``."""
    specs = cfg.specs()
    nets = [None] * len(specs)
    for i in sorted(range(len(specs)), key=lambda i: specs[i][1].path is None):
        flag, spec = specs[i]
        nets[i] = load_model(spec, flag, channel=source.shape[0], num_classes=source.num_outputs,
                             im_size=source.shape[1:], seed=cfg.seed + i, train=source,
                             cache=os.path.join(out, "models", f"{i:02d}_{flag}_{spec.arch}.pt"),
                             epochs=cfg.pretrain_epochs, data_key=source.key).to(cfg.device)
    teacher = nets.pop(0) if cfg.teacher is not None else None
    if teacher is not None and not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules()):
        raise ValueError(f"teacher: {cfg.teacher} has no BatchNorm2d layer, which SRe2L's recovery matches")
    metadd = MetaDDLoss(nets, alpha=cfg.metadd_alpha, precision=cfg.metadd_precision) if cfg.metadd_weight else None
    return Networks(teacher, metadd)


def _networks(cfg: EngineConfig, source, out: str, rank: int, group) -> Networks:
    """Each rank loads the networks once. In a distributed run rank 0 goes first (it trains and
    caches zoo networks); its error, if any, is raised on every rank."""
    if group is None:
        return _load_networks(cfg, source, out)
    error = [None]
    if rank == 0:
        try:
            nets = _load_networks(cfg, source, out)
        except ValueError as err:
            error = [str(err)]
    dist.broadcast_object_list(error, src=dist.get_global_rank(group, 0), group=group)
    if error[0] is not None:
        raise ValueError(error[0])
    return nets if rank == 0 else _load_networks(cfg, source, out)


def _distiller(cfg: EngineConfig, source, classes: list, nets: Networks):
    real = _chunk_real(source, classes, cfg.pin_memory, _reads_real(cfg))
    kw = dict(teacher=nets.teacher, init="noise") if cfg.method == "sre2l" else {}  # SRe2L recovers from noise
    return DISTILLERS[cfg.method](real, cfg.ipc, lr=cfg.lr, batch_real=cfg.batch_real, arch=cfg.arch,
                                  metadd=nets.metadd, metadd_weight=cfg.metadd_weight,
                                  robust_alpha=cfg.robust_alpha, robust_weight=cfg.robust_weight,
                                  robust_groups=cfg.robust_groups, seed=cfg.seed * 1_000_003 + classes[0],
                                  device=cfg.device, label_offset=classes[0], **kw)


def _coupled_step(distillers: list, offsets: list, num_groups: int, alpha: float, scale: float, device,
                  group) -> None:
    """One update of this rank's chunks of a round: each chunk's ``loss_terms()`` plus ``scale``
    times the CVaR over the groups of all the round's chunks (those of every rank of ``group``).
    Group ids are offset per chunk so that they are unique in the round. A rank without a chunk
    in the round still takes part."""
    for d in distillers:
        d.optimizer.zero_grad(set_to_none=True)
    terms, values, groups = [], [], []
    for d, offset in zip(distillers, offsets):
        terms += d.loss_terms().values()
        v, g = d.group_losses()
        values.append(v)
        groups.append(g + offset)
    if distillers:
        values, groups = torch.cat(values), torch.cat(groups)
    else:
        values, groups = torch.zeros(0, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    loss = cvar(values, alpha, groups, num_groups, process_group=group)
    if distillers:
        (scale * loss + sum(terms)).backward()
    for d in distillers:
        d.finish_step()


def _group_sizes(cfg: EngineConfig, real: Dataset, images: torch.Tensor, nets: Networks) -> torch.Tensor:
    """Real images per group (classes * ipc,) int64 over ALL real images of a chunk (``real``,
    its distiller's; ``images`` its final synthetic images (classes * ipc, C, H, W)), each in the
    group of its nearest final synthetic image of its class ("all": of any class of the chunk,
    which holds every class), in the embedding of the teacher, else the first MetaDD network,
    else a fresh ``arch`` network (seed ``cfg.seed``). Streamed a class (:func:`class_nearest_groups`)
    or a batch (:func:`nearest_groups`) at a time, each normalized from the chunk's stored images
    as it is embedded."""
    net = nets.teacher if nets.teacher is not None else nets.metadd.models[0] if nets.metadd is not None else None
    if net is None:
        torch.manual_seed(cfg.seed)
        net = get_model(cfg.arch, real.channel, real.num_classes, real.im_size).to(cfg.device).eval()
    embed, images = getattr(net, "embed", net), images.detach()
    if cfg.robust_groups == "all":
        batches = (real.take(idx) for idx in torch.arange(len(real.labels)).split(cfg.batch_real))
        ids = nearest_groups(embed, batches, images, batch_size=cfg.batch_real, device=cfg.device)
    else:
        by_class = class_batches(real)
        ids = class_nearest_groups(embed, lambda c: real.take(by_class[c]), range(real.num_classes), images,
                                   cfg.ipc, batch_size=cfg.batch_real, device=cfg.device)
    return torch.bincount(ids.cpu(), minlength=real.num_classes * cfg.ipc)


def _read_state(path: str, digest: str) -> Optional[dict]:
    """A rank's round checkpoint (None if there is none): {"digest", "round", "positions",
    "iteration", "distillers": [state_dict per chunk]}, refused if corrupt, crafted or another run's."""
    if not os.path.exists(path):
        return None
    state = load_checkpoint(path, "checkpoint")
    if not isinstance(state, dict) or state.get("digest") != digest or \
            not isinstance(state.get("distillers"), list) or not isinstance(state.get("iteration"), int):
        raise InputError(f"{path}: checkpoint does not match this run; delete it to start over")
    return state


def _resume(path: str, state: Optional[dict], round_index: int, positions: list, distillers: list) -> int:
    """Load ``state`` into the round's distillers if it is this round's; returns its iteration
    (0: start the round afresh; a checkpoint of an earlier round is stale and ignored)."""
    if state is None or state.get("round") != round_index or state.get("positions") != positions:
        return 0
    if len(state["distillers"]) != len(distillers):
        raise InputError(f"{path}: checkpoint does not match this run; delete it to start over")
    for d, sd in zip(distillers, state["distillers"]):
        images = sd.get("images") if isinstance(sd, dict) else None
        if not isinstance(images, torch.Tensor) or images.shape != d.images.shape:
            raise InputError(f"{path}: checkpoint does not match this run (expected synthetic images of shape "
                             f"{tuple(d.images.shape)}); delete it to start over")
        try:
            d.load_state_dict(sd)
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise InputError(f"{path}: the checkpoint does not fit this run ({first_line(err)}); "
                             f"delete it to start over") from err
    return state["iteration"]


@dataclasses.dataclass
class _Round:
    """Where a round stands: its index among the rounds, the rank's state file and what it held."""

    index: int
    state_path: str
    state: Optional[dict]
    digest: str


def _start(rnd: _Round, positions: list, distillers: list, group) -> int:
    """The iteration the round resumes from, -1 if the distillers must be rebuilt: coupled chunks
    of a distributed round resume only if every rank's checkpoint is at the same iteration."""
    done = _resume(rnd.state_path, rnd.state, rnd.index, positions, distillers)
    if group is None:
        return done
    both = torch.tensor([done, -done])
    dist.all_reduce(both, op=dist.ReduceOp.MIN, group=group)
    return done if int(both[0]) == -int(both[1]) else -1 if done else 0


def _run_round(cfg: EngineConfig, source, store: SyntheticStore, chunks: list, positions: list, group,
               nets: Networks, rnd: _Round, zca: Optional[ZCA], progress: bool) -> list:
    """Optimize the chunks at ``positions`` of a round (lists of classes) and write them to the
    store, saving the rank's part of the round every ``checkpoint_every`` steps. Returns what
    each chunk's marker adds: with robust_alpha its ``group_sizes``."""
    distillers = [_distiller(cfg, source, chunks[p], nets) for p in positions]
    done = _start(rnd, positions, distillers, group)
    if done < 0:  # this rank's checkpoint is ahead of another's: start the round afresh
        distillers, done = [_distiller(cfg, source, chunks[p], nets) for p in positions], 0
    sizes = [len(c) * cfg.ipc for c in chunks]
    offsets = [sum(sizes[:p]) for p in positions]
    with tqdm(total=cfg.iterations, initial=done, desc=f"round {rnd.index}", leave=False,
              disable=not progress) as bar:  # closed on failure too, so an error message starts its own line
        for it in range(done + 1, cfg.iterations + 1):
            if not cfg.coupled():
                for d in distillers:
                    terms = d.step()
                bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items()} if distillers else {})
            else:
                scale = cfg.robust_weight * sum(len(c) for c in chunks)  # as Distiller.robust_scale, per round
                _coupled_step(distillers, offsets, sum(sizes), cfg.robust_alpha, scale, cfg.device, group)
            bar.update(1)
            if cfg.checkpoint_every and (it % cfg.checkpoint_every == 0 or it == cfg.iterations):
                atomic_save({"digest": rnd.digest, "round": rnd.index, "positions": positions, "iteration": it,
                             "distillers": [d.state_dict() for d in distillers]}, rnd.state_path)
    for p, d in zip(positions, distillers):
        images = d.images.detach()
        store.write(chunks[p][0] * cfg.ipc, zca.unwhiten(images.cpu()) if zca is not None else images)
    if cfg.robust_alpha is None:
        return [{} for _ in positions]
    return [{"group_sizes": _group_sizes(cfg, d.real, d.images, nets)} for d in distillers]


def _read_marker(path: str, digest: str) -> bool:
    try:
        marker = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any read failure is a corrupt marker
        raise InputError(f"{path}: corrupt chunk checkpoint ({type(err).__name__}); delete it to redo the chunk") \
            from err
    if not isinstance(marker, dict) or marker.get("digest") != digest:
        raise InputError(f"{path}: checkpoint of another run (config or data differ); use another --out")
    return True


def _check_run_file(run_file: str, cfg: EngineConfig, digest: str, source_key: str, out: str) -> None:
    """Refuse a run folder whose run.json is unreadable or describes another run (naming what differs)."""
    have = load_json_object(run_file, "run description", "delete it or use --restart")
    if have.get("digest") == digest:
        return
    config = have.get("config") if isinstance(have.get("config"), dict) else {}
    diff = sorted(k for k, v in cfg.identity().items() if config.get(k) != v)
    diff += ["data"] if have.get("source") != source_key else []
    raise InputError(f"out: {out} holds a different run (differs in {', '.join(diff) or 'weights files'}); "
                     f"use another --out or --restart")


def run_chunked(cfg: EngineConfig, source, out: str, *, group=None, progress: bool = True) -> Optional[dict]:
    """Distill ``source`` (a class-indexed :class:`metadd_fast.sources.Source`: ``num_classes``,
    ``counts``, ``shape`` (C, H, W), ``mean``/``std``, ``num_outputs`` (the classes of the
    teacher and MetaDD networks, of which the source's are the first), ``key`` (its identity),
    ``class_images(c)`` or ``class_pixels(c)``, ``rows(idx)`` and ``labels()`` (to train zoo
    networks on, a batch at a time), ``save_index()``) in class chunks into ``out``. In a
    distributed run pass ``group`` (or rely on the default group); rank 0 returns {"images"
    (classes * ipc, C, H, W) float32 backed by ``synthetic.f32``, "labels" (classes * ipc,)
    int64, "seconds" (from the first chunk, the networks loaded), and with robust_alpha
    "group_sizes" (classes * ipc,) int64}, other ranks None. A rank whose peer dies or hangs
    raises :class:`~metadd_fast.ranks.RankFailure` naming it; ``run.json`` records the settings
    the result depends on (:mod:`metadd_fast.runinfo`)."""
    cfg.check(dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1)
    cfg.check_classes(source.num_classes)
    with ranks.watch(out, group):
        return _run_chunked(cfg, source, out, group, progress)


def _run_chunked(cfg: EngineConfig, source, out: str, group, progress: bool) -> Optional[dict]:
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    key = source.key
    digest = cfg.digest(key)
    run_file = os.path.join(out, "run.json")
    state_path = os.path.join(out, "state.pt" if rank == 0 else f"state.rank{rank}.pt")
    if rank == 0 and os.path.exists(run_file):
        _check_run_file(run_file, cfg, digest, key, out)
    state = _read_state(state_path, digest)  # read and checked before anything is written
    if cfg.zca:  # whitened as read; the ZCA is fitted when first needed (after the weights files)
        source = WhitenedSource(source)
    # Every network before the run's files: a bad weights file is reported with nothing written
    # (zoo networks without a file, loaded last, are trained and cached in <out>/models/).
    nets = _networks(cfg, source, out, rank, (group if group is not None else dist.group.WORLD)
                     if distributed else None)
    zca = source.zca if cfg.zca else None
    os.makedirs(os.path.join(out, "chunks"), exist_ok=True)
    if rank == 0:
        source.save_index()
    if rank == 0 and not os.path.exists(run_file):
        atomic_write_json({"digest": digest, "config": cfg.identity(), "source": key}, run_file)
    if rank == 0 and zca is not None:
        atomic_save(zca.state_dict(), os.path.join(out, "zca.pt"))
    env = runinfo.collect(cfg.seed, cfg.device, group)  # every rank: their thread counts
    if rank == 0:
        runinfo.note(run_file, env)
    if distributed:
        dist.barrier(group)
    n = source.num_classes
    store = SyntheticStore(os.path.join(out, "synthetic.f32"), n * cfg.ipc, source.shape)
    per = cfg.classes_per_chunk or n
    chunks = [list(range(s, min(n, s + per))) for s in range(0, n, per)]
    span = cfg.cvar_chunks if cfg.coupled() else 1
    rounds = [list(range(s, min(len(chunks), s + span))) for s in range(0, len(chunks), span)]
    if span == 1:  # independent chunks: rank r takes chunks r, r + world, ...
        mine = [(i, r, [0]) for i, r in list(enumerate(rounds))[rank::world]]
    else:  # coupled chunks: every rank takes part in every round, with every world-th chunk of it
        mine = [(i, r, list(range(rank, len(r), world))) for i, r in enumerate(rounds)]
    cvar_group = (group if group is not None else dist.group.WORLD) if distributed and span > 1 else None
    marker = lambda i: os.path.join(out, "chunks", f"chunk_{i:05d}.pt")  # noqa: E731
    start = time.perf_counter()
    for i, r, positions in tqdm(mine, desc=f"rank {rank} rounds" if span > 1 else f"rank {rank} chunks",
                                disable=not progress or len(mine) < 2):
        if all([os.path.exists(marker(c)) and _read_marker(marker(c), digest) for c in r]):
            continue  # every rank sees the same markers, so all skip a round or none does
        extras = _run_round(cfg, source, store, [chunks[c] for c in r], positions, cvar_group, nets,
                            _Round(i, state_path, state, digest), zca, progress)
        for p, extra in zip(positions, extras):
            atomic_save({"digest": digest, "classes": chunks[r[p]], **extra}, marker(r[p]))
    if distributed:
        dist.barrier(group)
    if rank != 0:
        return None
    missing = [i for i in range(len(chunks)) if not os.path.exists(marker(i))]
    if missing:
        raise RuntimeError(f"chunks {missing} are not finished")
    images = store.view()
    labels = torch.arange(n).repeat_interleave(cfg.ipc)
    save_synthetic(os.path.join(out, "synthetic.pt"), images, labels)
    result = {"images": images, "labels": labels, "seconds": time.perf_counter() - start}
    if cfg.robust_alpha is not None:
        result["group_sizes"] = torch.cat([torch.load(marker(i), weights_only=True)["group_sizes"]
                                           for i in range(len(chunks))])
        atomic_save({"group_sizes": result["group_sizes"]}, os.path.join(out, "groups.pt"))
    _save_figures(cfg, source, nets, images, out, zca)
    return result


def _save_figures(cfg: EngineConfig, source, nets: Networks, images: torch.Tensor, out: str,
                  zca: Optional[ZCA]) -> None:
    """synthetic.png and, with MetaDD, cams.png (the first classes only; the networks see a ZCA
    run's images whitened, as they were trained)."""
    save_synthetic_grid(os.path.join(out, "synthetic.png"), images, cfg.ipc, source.mean, source.std,
                        f"{cfg.method.upper()} on {source.name}, IPC {cfg.ipc}")
    if nets.metadd is not None:
        save_cams(os.path.join(out, "cams.png"), nets.metadd, images, cfg.ipc, source.mean, source.std,
                  cfg.metadd_models, to_networks=zca.whiten if zca is not None else None)
