"""Large-IPC runs of DM, DC and SRe2L (with MetaDD and robust DD): class chunks, a
memory-mapped synthetic set, class sharding across ranks, cross-rank robust-DD CVaR, and
per-chunk checkpoints that survive ``kill -9``.

The synthetic set (classes * ipc, C, H, W) float32 lives in ``<out>/synthetic.f32``, a
memory-mapped file, so host and device memory depend on the chunk, not on the IPC:
only the chunk being optimized is on the device (``device=``), its real images stay
on the host (pinned with ``pin_memory=True``, so batches copy asynchronously).
Classes are optimized ``classes_per_chunk`` at a time, each chunk by its own distiller.

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
images grouped by their nearest synthetic image of their class; the distillers'
``group_losses()``) of ``cvar_chunks`` chunks optimized together: one "round".
In a ``torch.distributed`` run (gloo on CPU, NCCL on GPU;
``torchrun`` sets the environment) the chunks of a round are split over the ranks and
the CVaR goes through the ``process_group=`` path of :func:`metadd_fast.cvar`, so every
rank's tail is the tail of the whole round. Otherwise (no robust_alpha) chunks
are independent and rank r takes chunks r, r + world, ... Either way the result depends
only on the configuration and the seed, not on the number of ranks.

With ``robust_alpha``, each finished chunk also groups ALL real images of its classes (not
only the sampled batches): each joins its nearest final synthetic image of its class
(:func:`metadd_fast.grouping.class_nearest_groups`, streamed a class at a time, so memory
does not grow with the real set). ``<out>/groups.pt`` holds ``group_sizes`` (classes * ipc,):
real images per synthetic image; a 0 is a synthetic image that represents no real one.

Each finished chunk is marked by an atomically written ``chunks/chunk_XXXXX.pt``; after
a barrier rank 0 writes the merged ``synthetic.pt``. A killed run restarted with the
same command skips finished rounds and redoes at most the one that was running. A
checkpoint from another run, or a corrupt one, is refused with a clear message.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .ops.cvar import cvar
from .data import Dataset
from .distill import DISTILLERS
from .errors import InputError
from .grouping import class_nearest_groups
from .metadd_loss import MetaDDLoss
from .precision import PRECISIONS
from .model_sources import file_digest, load_model, parse_spec
from .models import MODELS, get_model
from .results import atomic_save, atomic_write_json, load_json_object, save_synthetic

__all__ = ["EngineConfig", "SyntheticStore", "RandomImageSource", "DatasetSource", "run_chunked"]


@dataclasses.dataclass
class EngineConfig:
    """A chunked run. ``robust_alpha``: robust-DD CVaR tail (None: off) over the groups of a
    round of ``cvar_chunks`` chunks, with weight ``robust_weight`` (as the distillers'). ``metadd_weight``, ``metadd_models``
    (>= 2 spec strings), ``metadd_alpha``, ``metadd_precision``: the MetaDD term; ``teacher``: SRe2L's teacher
    spec; ``pretrain_epochs``: for zoo specs without weights. ``device`` and ``pin_memory``
    say where the run executes and are not part of the run's identity (a run may resume
    elsewhere)."""

    method: str = "dm"
    ipc: int = 10
    iterations: int = 20
    classes_per_chunk: int = 10
    batch_real: int = 64
    arch: str = "ConvNet"
    lr: Optional[float] = None
    seed: int = 0
    robust_alpha: Optional[float] = None
    robust_weight: float = 1.0
    cvar_chunks: int = 1
    metadd_weight: float = 0.0
    metadd_models: tuple = ()
    metadd_alpha: Optional[float] = None
    metadd_precision: str = "fp32"
    teacher: Optional[str] = None
    pretrain_epochs: int = 15
    device: Optional[str] = None
    pin_memory: bool = False

    def specs(self) -> list:
        """(flag, ModelSpec) of every network the run loads: the teacher, then the MetaDD networks."""
        out = [("teacher", parse_spec(self.teacher, "teacher"))] if self.teacher is not None else []
        return out + [("metadd_models", parse_spec(m, "metadd_models")) for m in self.metadd_models]

    def digest(self, source_key: str) -> str:
        config = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("device", "pin_memory")}
        weights = [file_digest(spec.path) for _, spec in self.specs() if spec.path is not None]
        blob = json.dumps({"config": config, "source": source_key, "weights": weights}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def coupled(self) -> bool:
        """Whether the robust CVaR couples the chunks of a round (every method's robust term is a
        CVaR over its ``group_losses()``)."""
        return self.robust_alpha is not None

    def check(self, world: int) -> None:
        if self.method not in DISTILLERS:
            raise ValueError(f"method: expected one of {', '.join(DISTILLERS)}, got {self.method!r}")
        for name in ("ipc", "iterations", "classes_per_chunk", "batch_real", "cvar_chunks", "pretrain_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
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


class RandomImageSource:
    """Real images made on demand, class by class (ImageNet-shaped scale tests without ImageNet):
    ``per_class`` images of ``shape`` whose mean depends on the class."""

    def __init__(self, num_classes: int, per_class: int, shape: tuple, seed: int = 0):
        self.num_classes, self.per_class, self.shape, self.seed = num_classes, per_class, tuple(shape), seed
        self.num_outputs = num_classes
        self.key = f"random:{num_classes}:{per_class}:{self.shape}:{seed}"

    def __call__(self, c: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + c)
        return torch.randn(self.per_class, *self.shape, generator=g) + torch.randn(1, *self.shape, generator=g)

    def dataset(self) -> Dataset:
        """Every class at once (to train zoo networks on; small sources only)."""
        return _chunk_dataset(self, list(range(self.num_classes)), False)


class DatasetSource:
    """Real images of one class from an in-memory :class:`Dataset`."""

    def __init__(self, ds: Dataset):
        self.ds, self.num_classes, self.shape = ds, ds.num_classes, tuple(ds.images.shape[1:])
        self.num_outputs = ds.num_classes
        self.key = f"dataset:{ds.name}:{len(ds)}:{self.shape}"

    def __call__(self, c: int) -> torch.Tensor:
        return self.ds.images[self.ds.labels == c]

    def dataset(self) -> Dataset:
        return self.ds


def _chunk_dataset(source: Callable, classes: list, pin: bool) -> Dataset:
    images = [source(c) for c in classes]
    labels = torch.cat([torch.full((len(x),), i, dtype=torch.int64) for i, x in enumerate(images)])
    channel = images[0].shape[1]
    images = torch.cat(images)
    return Dataset("chunk", images.pin_memory() if pin else images, labels, len(classes), (0.0,) * channel,
                   (1.0,) * channel)


@dataclasses.dataclass
class Networks:
    """What every chunk of a rank shares: SRe2L's teacher and the MetaDD loss (or None)."""

    teacher: Optional[torch.nn.Module] = None
    metadd: Optional[MetaDDLoss] = None


def _load_networks(cfg: EngineConfig, source, out: str) -> Networks:
    """The teacher and MetaDD networks on ``cfg.device``; zoo specs without weights are trained
    on ``source.dataset()`` and cached in ``<out>/models/``."""
    nets = []
    for i, (flag, spec) in enumerate(cfg.specs()):
        nets.append(load_model(spec, flag, channel=source.shape[0], num_classes=source.num_outputs,
                               im_size=source.shape[1:], seed=cfg.seed + i, train=source.dataset,
                               cache=os.path.join(out, "models", f"{i:02d}_{flag}_{spec.arch}.pt"),
                               epochs=cfg.pretrain_epochs, data_key=source.key).to(cfg.device))
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
    real = _chunk_dataset(source, classes, cfg.pin_memory)
    kw = dict(teacher=nets.teacher) if cfg.method == "sre2l" else {}
    return DISTILLERS[cfg.method](real, cfg.ipc, lr=cfg.lr, batch_real=cfg.batch_real, arch=cfg.arch,
                                  metadd=nets.metadd, metadd_weight=cfg.metadd_weight,
                                  robust_alpha=cfg.robust_alpha, robust_weight=cfg.robust_weight, seed=cfg.seed * 1_000_003 + classes[0],
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


def _group_sizes(cfg: EngineConfig, source, classes: list, images: torch.Tensor, nets: Networks) -> torch.Tensor:
    """Real images per group (len(classes) * ipc,) int64 over ALL real images of the chunk's
    classes, each in the group of its nearest final synthetic image of its class, in the
    embedding of the teacher, else the first MetaDD network, else a fresh ``arch`` network
    (seed ``cfg.seed``). Streamed a class at a time (:func:`class_nearest_groups`)."""
    net = nets.teacher if nets.teacher is not None else nets.metadd.models[0] if nets.metadd is not None else None
    if net is None:
        torch.manual_seed(cfg.seed)
        net = get_model(cfg.arch, source.shape[0], len(classes), source.shape[1:]).to(cfg.device).eval()
    ids = class_nearest_groups(getattr(net, "embed", net), source, classes, images.detach(), cfg.ipc,
                               batch_size=cfg.batch_real, device=cfg.device)
    return torch.bincount(ids.cpu(), minlength=len(classes) * cfg.ipc)


def _run_round(cfg: EngineConfig, source, store: SyntheticStore, chunks: list, positions: list, group,
               nets: Networks) -> list:
    """Optimize the chunks at ``positions`` of a round (lists of classes) and write them to the
    store. Returns what each chunk's marker adds: with robust_alpha its ``group_sizes``."""
    distillers = [_distiller(cfg, source, chunks[p], nets) for p in positions]
    sizes = [len(c) * cfg.ipc for c in chunks]
    offsets = [sum(sizes[:p]) for p in positions]
    for _ in range(cfg.iterations):
        if not cfg.coupled():
            for d in distillers:
                d.step()
        else:
            scale = cfg.robust_weight * sum(len(c) for c in chunks)  # as Distiller.robust_scale, per round
            _coupled_step(distillers, offsets, sum(sizes), cfg.robust_alpha, scale, cfg.device, group)
    for p, d in zip(positions, distillers):
        store.write(chunks[p][0] * cfg.ipc, d.images)
    if cfg.robust_alpha is None:
        return [{} for _ in positions]
    return [{"group_sizes": _group_sizes(cfg, source, chunks[p], d.images, nets)}
            for p, d in zip(positions, distillers)]


def _read_marker(path: str, digest: str) -> bool:
    try:
        marker = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any read failure is a corrupt marker
        raise InputError(f"{path}: corrupt chunk checkpoint ({type(err).__name__}); delete it to redo the chunk") \
            from err
    if not isinstance(marker, dict) or marker.get("digest") != digest:
        raise InputError(f"{path}: checkpoint of another run (config or data differ); use another --out")
    return True


def run_chunked(cfg: EngineConfig, source, out: str, *, group=None, progress: bool = True) -> Optional[dict]:
    """Distill ``source`` (a callable class -> real images (n, C, H, W), with ``num_classes``,
    ``shape`` (C, H, W), ``num_outputs`` (the classes of the teacher and MetaDD networks, of
    which the source's are the first), ``key`` (its identity) and ``dataset()`` (all of it,
    to train zoo networks on)) in class chunks into ``out``. In a distributed run pass ``group`` (or rely on the
    default group); rank 0 returns {"images" (classes * ipc, C, H, W) float32 backed by
    ``synthetic.f32``, "labels" (classes * ipc,) int64, "seconds" (from the first chunk, the
    networks loaded), and with robust_alpha "group_sizes" (classes * ipc,) int64}, other
    ranks None."""
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    cfg.check(world)
    digest = cfg.digest(source.key)
    os.makedirs(os.path.join(out, "chunks"), exist_ok=True)
    run_file = os.path.join(out, "run.json")
    if rank == 0:
        if os.path.exists(run_file):
            if load_json_object(run_file, "run description", "delete it or use --restart").get("digest") != digest:
                raise InputError(f"out: {out} holds a different run; use another --out")
        else:
            atomic_write_json({"digest": digest, "config": dataclasses.asdict(cfg), "source": source.key}, run_file)
    if distributed:
        dist.barrier(group)
    n = source.num_classes
    store = SyntheticStore(os.path.join(out, "synthetic.f32"), n * cfg.ipc, source.shape)
    chunks = [list(range(s, min(n, s + cfg.classes_per_chunk))) for s in range(0, n, cfg.classes_per_chunk)]
    span = cfg.cvar_chunks if cfg.coupled() else 1
    rounds = [list(range(s, min(len(chunks), s + span))) for s in range(0, len(chunks), span)]
    if span == 1:  # independent chunks: rank r takes chunks r, r + world, ...
        mine = [(r, [0]) for r in rounds[rank::world]]
    else:  # coupled chunks: every rank takes part in every round, with every world-th chunk of it
        mine = [(r, list(range(rank, len(r), world))) for r in rounds]
    cvar_group = (group if group is not None else dist.group.WORLD) if distributed and span > 1 else None
    nets = _networks(cfg, source, out, rank, (group if group is not None else dist.group.WORLD)
                     if distributed else None)
    marker = lambda i: os.path.join(out, "chunks", f"chunk_{i:05d}.pt")  # noqa: E731
    start = time.perf_counter()
    for r, positions in tqdm(mine, desc=f"rank {rank} rounds" if span > 1 else f"rank {rank} chunks",
                             disable=not progress):
        if all([os.path.exists(marker(i)) and _read_marker(marker(i), digest) for i in r]):
            continue  # every rank sees the same markers, so all skip a round or none does
        extras = _run_round(cfg, source, store, [chunks[i] for i in r], positions, cvar_group, nets)
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
    return result
