"""Networks a run is given by name: SRe2L teachers and MetaDD networks.

A spec is ``[SOURCE:]ARCH[=PATH]``:

- ``ARCH=PATH``: the zoo network ARCH (:data:`metadd_fast.models.MODELS`, ImageNet forms
  included) with the state_dict in PATH;
- ``torchvision:NAME=PATH`` / ``timm:NAME=PATH``: built by that library without weights
  (nothing is ever downloaded), then the state_dict in PATH; refused with a clear
  message where the library does not import (torchvision does not import with the CPU
  torch here); a PATH is required;
- ``ARCH`` alone: the zoo network trained on the real data (a class-indexed source, read
  one batch at a time: DC's protocol, :func:`metadd_fast.training.train_model`) and cached
  in the run folder as a state_dict, so a resumed run or another rank reads it instead of
  training again.

PATH files are read with ``torch.load(weights_only=True)`` (never as code) and must hold
a state_dict: a mapping of parameter names to tensors, or such a mapping under
``"state_dict"`` or ``"model"``. Every failure is a ValueError naming the flag and file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from typing import Optional

import torch
from torch import nn

from . import argcheck
from .errors import InputError, InputTypeError, first_line, load_failure
from .models import MODELS, get_model
from .results import atomic_save
from .sources import Source
from .training import train_model

__all__ = ["ModelSpec", "parse_spec", "parse_specs", "read_state_dict", "load_model", "file_digest"]

SOURCES = ("zoo", "torchvision", "timm")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One network: ``source`` (zoo, torchvision or timm), ``arch`` and an optional state_dict ``path``."""

    source: str
    arch: str
    path: Optional[str] = None

    def __str__(self) -> str:
        name = self.arch if self.source == "zoo" else f"{self.source}:{self.arch}"
        return name if self.path is None else f"{name}={self.path}"


def parse_spec(text: str, flag: str) -> ModelSpec:
    """``[SOURCE:]ARCH[=PATH]`` -> ModelSpec; ValueError naming ``flag`` (the option or argument
    the text came from, e.g. "--teacher") if malformed or unknown."""
    argcheck.string("flag", flag, "the name of the option the spec came from, e.g. '--teacher'")
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{flag}: expected [SOURCE:]ARCH[=PATH], got {text!r}")
    name, eq, path = text.strip().partition("=")
    if eq and not path:
        raise InputError(f"{flag}: no weights file after '=' in {text!r}")
    source, _, arch = name.rpartition(":")
    source = source or "zoo"
    if source not in SOURCES:
        raise InputError(f"{flag}: unknown source {source!r} in {text!r}; expected one of {', '.join(SOURCES)}")
    if not arch:
        raise InputError(f"{flag}: no network name in {text!r}")
    if source == "zoo" and arch not in MODELS:
        raise InputError(f"{flag}: unknown zoo network {arch!r}; expected one of {', '.join(MODELS)}")
    if source != "zoo" and not path:
        raise InputError(f"{flag}: {source}:{arch} needs a local weights file ({source}:{arch}=PATH); "
                         f"nothing is downloaded")
    if path and not os.path.isfile(path):
        raise InputError(f"{flag}: {path}: no such file")
    return ModelSpec(source, arch, path or None)


def parse_specs(text: str, flag: str) -> list:
    """Comma-separated specs -> [ModelSpec]."""
    if not isinstance(text, str):
        raise InputTypeError(f"{flag}: expected comma-separated [SOURCE:]ARCH[=PATH] specs, got "
                                      f"{type(text).__name__}")
    return [parse_spec(part, flag) for part in text.split(",")]


def file_digest(path: str) -> str:
    """sha256 of a weights file (part of a run's identity: other weights are another run)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def read_state_dict(path: str, flag: str) -> dict:
    """The state_dict in ``path``, read with weights_only=True; ValueError if it is none."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"{flag}: expected a weights file path, got {type(path).__name__}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled code, a corrupt or foreign file: all refused the same way
        raise InputError(f"{flag}: {path}: not a weights file torch.load(weights_only=True) reads "
                         f"({type(err).__name__})") from err
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise InputError(f"{flag}: {path}: expected a state_dict (parameter names -> tensors), got "
                         f"{type(obj).__name__}")
    return obj


def _library_model(spec: ModelSpec, flag: str, num_classes: int) -> nn.Module:
    try:
        lib = importlib.import_module("torchvision.models" if spec.source == "torchvision" else "timm")
    except Exception as err:  # ImportError, or a torchvision built for another torch
        raise InputError(f"{flag}: {spec}: {spec.source} does not import here ({type(err).__name__}: {err}); "
                         f"use a zoo network (e.g. ResNet18ImageNet=PATH takes torchvision resnet18 weights)") \
            from err
    try:
        if spec.source == "torchvision":
            return lib.get_model(spec.arch, weights=None, num_classes=num_classes)
        return lib.create_model(spec.arch, pretrained=False, num_classes=num_classes)
    except Exception as err:  # unknown name or bad arguments, in the library's words
        raise InputError(f"{flag}: {spec}: {spec.source} cannot build {spec.arch!r} ({err})") from err


def _cached_zoo_model(net: nn.Module, train: Source, cache: str, key: dict, epochs: int, seed: int) -> nn.Module:
    """Train ``net`` on ``train`` (a Source, one batch at a time) unless ``cache`` holds it for ``key``."""
    blob = json.dumps(key, sort_keys=True)
    if os.path.exists(cache):
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True)
        except Exception as err:  # any read failure: a corrupt cache file, or one that names code to run
            refused, detail = load_failure(err)
            raise InputError(f"{cache}: {'refused: ' if refused else ''}corrupt cached network ({detail}); "
                             f"delete it to start over (the network is trained again)") from err
        if isinstance(saved, dict) and saved.get("key") == blob:
            try:
                net.load_state_dict(saved["state_dict"])
            except (RuntimeError, TypeError, KeyError, AttributeError) as err:
                raise InputError(f"{cache}: the cached network does not fit ({first_line(err)}); "
                                 f"delete it to start over (the network is trained again)") from err
            return net
    train_model(net, train, train.labels(), epochs=epochs, seed=seed)
    atomic_save({"key": blob, "state_dict": net.state_dict()}, cache)
    return net


def _check_train(train: Source, channel: int, num_classes: int, im_size: tuple) -> None:
    """``train`` (a Source) fits the network it trains (from its shape and classes, no image
    read): InputError naming ``train`` otherwise."""
    if train.shape[0] != channel or tuple(train.shape[1:]) != im_size or train.num_classes > num_classes:
        raise InputError(f"train: real data of {train.shape[0]}-channel {tuple(train.shape[1:])} images in "
                         f"{train.num_classes} classes do not fit a network for channel={channel}, "
                         f"im_size={im_size}, num_classes={num_classes}")


def load_model(spec: ModelSpec, flag: str, *, channel: int, num_classes: int, im_size, seed: int = 0,
               train: Optional[Source] = None, cache: Optional[str] = None, epochs: int = 15,
               data_key: str = "") -> nn.Module:
    """The network of ``spec`` for (channel, im_size) images and ``num_classes`` classes, in eval
    mode on the CPU. A zoo spec without a path is trained on ``train`` (a
    :class:`~metadd_fast.sources.Source` of ``channel``-channel ``im_size`` images in at most
    ``num_classes`` classes, checked first; :class:`~metadd_fast.sources.TensorSource` for a
    Dataset), read one batch at a time (:meth:`~metadd_fast.sources.Source.rows`: an image
    folder decodes each batch's files, every image once an epoch), and cached in ``cache``
    (keyed by the spec, ``data_key``, ``epochs`` and ``seed``)."""
    argcheck.instance("spec", spec, ModelSpec, "a ModelSpec (see parse_spec)")
    argcheck.positive_int("channel", channel)
    argcheck.positive_int("num_classes", num_classes)
    im_size = argcheck.image_size("im_size", im_size)
    argcheck.seed("seed", seed)
    argcheck.positive_int("epochs", epochs)
    argcheck.optional(argcheck.instance, "train", train, Source, "None or a metadd_fast.sources.Source")
    argcheck.optional(argcheck.instance, "cache", cache, (str, os.PathLike), "None or a file path")
    argcheck.instance("data_key", data_key, str, "a str")
    if spec.source == "zoo":
        torch.manual_seed(seed)
        net = get_model(spec.arch, channel, num_classes, im_size)
    else:
        net = _library_model(spec, flag, num_classes)
    if spec.path is None:
        if train is None or cache is None:
            raise InputError(f"{flag}: {spec} has no weights file and there is no real data to train it on")
        _check_train(train, channel, num_classes, im_size)
        key = {"spec": str(spec), "data": data_key, "epochs": epochs, "seed": seed,
               "shape": [channel, num_classes, *im_size]}
        return _cached_zoo_model(net, train, cache, key, epochs, seed).eval()
    try:
        net.load_state_dict(read_state_dict(spec.path, flag))
    except RuntimeError as err:  # missing, unexpected or mis-shaped parameters
        first = str(err).strip().splitlines()
        raise InputError(f"{flag}: {spec.path} does not fit {spec} for {channel}-channel {tuple(im_size)} images "
                         f"and {num_classes} classes: {' '.join(first[:2])[:300]}") from err
    return net.eval()
