"""Generated cases over the public API, and the worker that runs them (tests/test_fuzz_api.py).

Each entry point has a valid base call; every case changes one argument (or a few, for the
arguments that act only together) to a generated valid or invalid value. A case is
*valid* (the call must run: no exception) or *invalid* (the call must raise TypeError or
ValueError whose message names the argument, before doing the work). Tensors and networks
are made inside the worker (``Lazy``), so building the list costs nothing.

Run as a script, the worker runs cases ``--start`` to ``--stop`` (every ``--step``-th) and
prints one JSON line per case: ``{"id", "event": "start"}`` before it, then
``{"id", "outcome": "accepted" | "refused" | "crashed", "error"}`` (an exception that is not a
TypeError/ValueError is "crashed"); the harness kills a worker that hangs or dies and
resumes after the case that did it. ``--list`` prints the cases.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable

NAN, INF = float("nan"), float("inf")


class Lazy:
    """A value made in the worker when the case runs (tensors, networks, files)."""

    def __init__(self, make: Callable, label: str):
        self.make, self.label = make, label

    def __repr__(self) -> str:
        return self.label


@dataclass
class Case:
    entry: str  # the public entry point, e.g. "distill.DM"
    what: str  # the argument(s) changed and how
    valid: bool
    run: Callable[[], object]  # makes the call
    names: tuple = ()  # an invalid case's message must name one of these

    @property
    def id(self) -> str:
        return f"{self.entry}[{self.what}]"


# ---- fixtures (made once per worker, on first use) --------------------------------------------------

_CACHE: dict = {}


def _once(key: str, make: Callable):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _tmp() -> str:
    return _once("tmp", lambda: tempfile.mkdtemp(prefix="fuzz_api_"))


def dataset(classes: int = 3, per_class: int = 6, channel: int = 1, size: int = 8, seed: int = 0):
    """A tiny Dataset: ``classes`` x ``per_class`` random images (channel, size, size)."""
    def make():
        import torch
        from metadd_fast.data import Dataset

        g = torch.Generator().manual_seed(seed)
        n = classes * per_class
        return Dataset("fuzz", torch.randn(n, channel, size, size, generator=g),
                       torch.arange(classes).repeat_interleave(per_class), classes, (0.0,) * channel,
                       (1.0,) * channel)
    return _once(f"ds{classes},{per_class},{channel},{size},{seed}", make)


def tensor_source(ds):
    """``ds`` (a Dataset) behind the class-source interface."""
    from metadd_fast.sources import TensorSource

    return TensorSource(ds)


def small_net(kind: str = "cam", classes: int = 3, channel: int = 1, size: int = 8):
    """A tiny zoo ConvNet (width 8, one block: a 4x4 map at 8x8): "cam" (group norm), "bn"
    (batch norm, eval mode: SRe2L's teacher), "max" (max pooling)."""
    def make():
        import torch
        from metadd_fast.models import ConvNet

        torch.manual_seed({"cam": 1, "bn": 2, "max": 3}[kind])
        net = ConvNet(channel, classes, width=8, depth=1, im_size=(size, size),
                      norm="batchnorm" if kind == "bn" else "instancenorm",
                      pooling="maxpooling" if kind == "max" else "avgpooling")
        return net.eval()
    return _once(f"net{kind},{classes},{channel},{size}", make)


def tensor(kind: str, *shape, **kw):
    """A Lazy tensor: "randn", "int" (int64 0..2), "nan" (randn with one NaN), "zeros"."""
    def make():
        import torch

        g = torch.Generator().manual_seed(5)
        if kind == "int":
            return torch.randint(3, shape, generator=g)
        t = torch.zeros(shape) if kind == "zeros" else torch.randn(*shape, generator=g)
        if kind == "nan" and t.numel():
            t.view(-1)[0] = NAN
        return t.to(**kw) if kw else t
    return Lazy(make, f"{kind}{tuple(shape)}{kw or ''}")


def labels(*values):
    def make():
        import torch

        return torch.tensor(values, dtype=torch.int64)
    return Lazy(make, f"labels{values}")


def _mask(n: int) -> Callable:
    def make():
        import torch

        return torch.arange(n) % 3 == 0
    return make


def resolve(v):
    if isinstance(v, Lazy):
        return v.make()
    if isinstance(v, list):
        return [resolve(x) for x in v]
    if isinstance(v, tuple):
        return tuple(resolve(x) for x in v)
    return v


# ---- generated values by kind ------------------------------------------------------------------------

BAD = {
    "count": [0, -1, True, 2.5, "3", None, 2 ** 70],
    "count?": [0, -1, True, 2.5, "3", 2 ** 70],  # None is valid
    "pfloat": [0.0, -1.0, NAN, INF, True, "0.1", None],
    "pfloat?": [0.0, -1.0, NAN, INF, -INF, True, "0.1"],
    "nnfloat": [-0.5, NAN, INF, True, "1", None],
    "fraction?": [0.0, -0.5, 1.5, NAN, True, "0.5"],
    "seed": [-1, 2 ** 70, 1.5, True, "0", None],
    "bool": [1, 0, "yes", None],
}
GOOD = {
    "count": [1, 2], "count?": [None, 1, 2], "pfloat": [1, 0.5], "pfloat?": [None, 1, 0.05],
    "nnfloat": [0, 0.5], "fraction?": [None, 1, 0.5], "seed": [0, 7, 2 ** 40], "bool": [True, False],
}


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


class Entry:
    """One public entry point: ``call(**kwargs)`` with the valid ``base`` kwargs."""

    def __init__(self, name: str, call: Callable, base: dict):
        self.name, self.call, self.base = name, call, base
        self.cases: list = [Case(name, "base", True, self._runner({}))]

    def _runner(self, change: dict):
        def run():
            kw = {k: resolve(v) for k, v in {**self.base, **change}.items()}
            return self.call(**kw)
        return run

    def arg(self, name: str, kind: str = None, *, bad=(), good=(), names=None, kind_good: bool = True):
        """Cases for one argument: generated values of ``kind`` plus explicit ``bad``/``good``
        (without the generated valid values of ``kind`` if not ``kind_good``)."""
        for v in (BAD.get(kind, []) if kind else []) + list(bad):
            self.cases.append(Case(self.name, f"{name}={_short(v)}", False, self._runner({name: v}),
                                   names or (name,)))
        for v in (GOOD.get(kind, []) if kind and kind_good else []) + list(good):
            self.cases.append(Case(self.name, f"{name}={_short(v)}", True, self._runner({name: v})))
        return self

    def combo(self, change: dict, valid: bool, names=None):
        """A case changing several arguments together (arguments that act only together)."""
        what = ",".join(f"{k}={_short(v)}" for k, v in change.items())
        self.cases.append(Case(self.name, what, valid, self._runner(change), names or tuple(change)))
        return self


# ---- the entry points ------------------------------------------------------------------------------------

def _data_entries() -> list:
    from metadd_fast import data

    def image_folder():
        from PIL import Image

        root = os.path.join(_tmp(), "folder")
        if not os.path.isdir(root):
            for c in ("a", "b"):
                os.makedirs(os.path.join(root, c))
                for i in range(2):
                    Image.new("RGB", (10, 12), (40 * i, 80, 120)).save(os.path.join(root, c, f"{i}.png"))
        return root

    def cifar_folder():
        import pickle

        import numpy as np

        root = os.path.join(_tmp(), "cifar")
        if not os.path.isdir(root):
            os.makedirs(root)
            for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
                batch = {b"data": np.zeros((4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
                with open(os.path.join(root, name), "wb") as f:
                    pickle.dump(batch, f)
        return root

    folder = Lazy(image_folder, "<image folder>")
    out = [
        Entry("data.load_digits", data.load_digits, {"split": "train", "size": 8})
        .arg("size", "count", bad=[7, 16.0, 10 ** 4, 1 << 40], good=[16], kind_good=False)
        .arg("split", bad=["val", 1, None], good=["test"]),
        Entry("data.with_inverted_minority", data.with_inverted_minority,
              {"ds": Lazy(dataset, "<dataset>"), "share": 0.25, "seed": 0})
        .arg("share", bad=[-0.1, 1.5, NAN, True, "0.5", None], good=[0, 1, 0.5])
        .arg("seed", "seed")
        .arg("ds", bad=[None, "digits", tensor("randn", 2, 1, 8, 8)]),
        Entry("data.load_cifar", data.load_cifar, {"path": Lazy(cifar_folder, "<cifar folder>"), "split": "train",
                                                   "name": "cifar10"})
        .arg("split", bad=["val", 1], good=["test"])
        .arg("name", bad=["cifar1000", 10, None])
        .arg("path", bad=[3, None, "/nonexistent/cifar"]),
        Entry("data.load_image_folder", data.load_image_folder, {"root": folder, "size": 8})
        .arg("size", "count?", bad=[(0, 8), (8,), (8, 8, 8), "8", (8, -1), 10 ** 5, (8.0, 8)],
             good=[(8, 12), 12])
        .arg("root", bad=[3, None, "/nonexistent/folder"]),
        Entry("data.load", data.load, {"name": "digits", "split": "test", "size": 8})
        .arg("name", bad=["mnist", 3, None])
        .arg("split", bad=["val", None])
        .arg("size", bad=[0, -1, 7, True, 8.5, "8", 10 ** 4], good=[None, 16])
        .arg("path", bad=["/tmp", 3])  # digits are embedded: a path does nothing
        .combo({"name": "cifar10", "path": None}, False, ("path",))
        .combo({"name": "folder", "path": folder, "size": 8}, True)
        .combo({"name": "folder", "path": folder, "size": 0}, False, ("size",)),
        Entry("data.class_batches", data.class_batches, {"ds": Lazy(dataset, "<dataset>")})
        .arg("ds", bad=[None, "digits", 3]),
    ]
    return out


def _kmeans_entries() -> list:
    import torch

    from metadd_fast import kmeans

    x = tensor("randn", 12, 3)
    return [
        Entry("kmeans", kmeans, {"x": x, "k": 3, "iters": 5, "seed": 0})
        .arg("x", bad=[tensor("int", 12, 3), tensor("randn", 12), tensor("randn", 0, 3), [[1.0, 2.0]],
                       tensor("nan", 12, 3), None], good=[tensor("randn", 12, 3, dtype=torch.float64)])
        .arg("k", "count", bad=[13, 3.0], good=[12])
        .arg("iters", "count")
        .arg("seed", "seed")
        .arg("tol", bad=[-1.0, NAN, INF, True, "0"], good=[0, 0.1])
        .arg("init", bad=["bogus", 3, None, tensor("randn", 2, 3), tensor("int", 3, 3), tensor("nan", 3, 3)],
             good=["random", tensor("randn", 3, 3)])
        .arg("backend", bad=["cuda", 3, "fast"], good=[None, "reference"]),
    ]


def _grouping_entries() -> list:
    from metadd_fast import grouping

    net = Lazy(small_net, "<ConvNet>")
    real = tensor("randn", 10, 1, 8, 8)
    syn = tensor("randn", 3, 1, 8, 8)

    def real_of_class(c):
        return resolve(tensor("randn", 4, 1, 8, 8))

    return [
        Entry("grouping.embed", grouping.embed, {"net": net, "images": real, "batch_size": 4})
        .arg("batch_size", "count", bad=[4.0])
        .arg("net", bad=[3, None])
        .arg("images", bad=[tensor("int", 4, 1, 8, 8), tensor("randn", 0, 1, 8, 8), 3, None,
                            tensor("randn", 4, 3, 8, 8)], good=[[tensor("randn", 2, 1, 8, 8)]])
        .arg("device", bad=["gpu", 3], good=[None, "cpu"]),
        Entry("grouping.nearest_groups", grouping.nearest_groups, {"net": net, "real": real, "synthetic": syn})
        .arg("synthetic", bad=[tensor("int", 3, 1, 8, 8), tensor("randn", 0, 1, 8, 8), [1.0], None,
                               tensor("randn", 3, 2, 8, 8)])
        .arg("real", bad=[tensor("int", 10, 1, 8, 8), tensor("randn", 0, 1, 8, 8), None, tensor("randn", 10, 8, 8)])
        .arg("batch_size", "count")
        .arg("backend", bad=["bogus", 1], good=["reference"]),
        Entry("grouping.class_nearest_groups", grouping.class_nearest_groups,
              {"net": net, "real_of_class": real_of_class, "classes": [0, 1], "synthetic": tensor("randn", 4, 1, 8, 8),
               "ipc": 2})
        .arg("ipc", "count", bad=[3], good=[2], kind_good=False, names=("ipc", "synthetic"))
        .arg("classes", bad=[[], [0, 1.5], 3, None, [0, True]], names=("classes", "synthetic"))
        .arg("real_of_class", bad=[3, None])
        .arg("synthetic", bad=[tensor("int", 4, 1, 8, 8), None, tensor("randn", 5, 1, 8, 8)]),
        Entry("grouping.kmeans_groups", grouping.kmeans_groups, {"net": net, "real": real, "k": 2})
        .arg("k", "count", bad=[11])
        .arg("batch_size", "count", bad=[]),
    ]


def _evaluate_entries() -> list:
    from metadd_fast import evaluate

    test = Lazy(lambda: dataset(3, 4, seed=1), "<test set>")
    images = tensor("randn", 6, 1, 8, 8)
    base = {"images": images, "labels": labels(0, 0, 1, 1, 2, 2), "test": test, "archs": ["ConvNet"],
            "seeds": 1, "epochs": 1, "augment": None, "progress": False}
    return [
        Entry("evaluate.evaluate_synthetic", evaluate.evaluate_synthetic, base)
        .arg("seeds", "count", bad=[], good=[])
        .arg("epochs", "count?", good=[])  # None: the recipe's
        .arg("lr", "pfloat?", good=[])
        .arg("batch_size", "count?", good=[])
        .arg("augment", bad=["bogus", 3, ""], good=["flip"])
        .arg("progress", "bool", good=[])
        .arg("archs", bad=["ConvNet", [], ["Nope"], 3, None])
        .arg("images", bad=[tensor("int", 6, 1, 8, 8), tensor("randn", 6, 8, 8), tensor("randn", 6, 1, 9, 9),
                            tensor("nan", 6, 1, 8, 8), None])
        .arg("labels", bad=[labels(0, 0, 1, 1, 2, 3), labels(0, 1), tensor("randn", 6), labels(-1, 0, 1, 1, 2, 2),
                            None])
        .arg("test", bad=[None, "digits"])
        .arg("clusters", bad=[tensor("int", 5), tensor("randn", 12), 3, labels(*([0, 1] * 5))],
             good=[labels(*([0, 1] * 6))])
        .arg("minority", bad=[tensor("int", 12), tensor("randn", 12), 3, Lazy(_mask(5), "<bool (5,)>")],
             good=[Lazy(_mask(12), "<bool (12,)>")]),
        Entry("evaluate.test_clusters", evaluate.test_clusters, {"test": test, "k": 3})
        .arg("k", "count", good=[100])
        .arg("seed", "seed")
        .arg("test", bad=[None, 3]),
    ]


def _engine_entries() -> list:
    from metadd_fast.engine import EngineConfig

    def check(world=1, **kw):
        return EngineConfig(**kw).check(world)

    e = Entry("engine.EngineConfig.check", check, {"world": 1})
    for name in ("ipc", "iterations", "batch_real", "pretrain_epochs"):
        e.arg(name, "count", good=[])
    e.arg("classes_per_chunk", "count?", good=[])  # None: one chunk of every class
    e.arg("lr", "pfloat?", good=[]).arg("seed", "seed", good=[]).arg("metadd_weight", bad=[-1.0, NAN, INF, True, "1"])
    e.arg("method", bad=["kip", 3, None]).arg("arch", bad=["Nope", 3]).arg("world", "count", good=[])
    e.arg("pin_memory", bad=[1, "yes", None]).arg("device", bad=["gpu", 3], good=["cpu"])
    e.arg("robust_alpha", "fraction?", good=[])
    e.combo({"robust_alpha": 0.5, "robust_weight": NAN}, False, ("robust_weight",))
    e.combo({"robust_alpha": 0.5, "robust_weight": 0.0}, False, ("robust_weight",))
    e.combo({"robust_alpha": 0.5, "robust_weight": 2.0}, True)
    e.combo({"robust_weight": 2.0}, False, ("robust_weight",))  # does nothing without robust_alpha
    e.combo({"cvar_chunks": 2}, False, ("cvar_chunks",))
    e.combo({"robust_alpha": 0.5, "cvar_chunks": 2}, True)
    e.combo({"robust_alpha": 0.5, "cvar_chunks": 0}, False, ("cvar_chunks",))
    for groups in ("global", "ALL", 1, None):
        e.combo({"robust_alpha": 0.5, "robust_groups": groups}, False, ("robust_groups",))
    e.combo({"robust_alpha": 0.5, "robust_groups": "all"}, True)
    e.combo({"robust_groups": "all"}, False, ("robust_groups",))  # does nothing without robust_alpha
    e.combo({"method": "sre2l"}, False, ("teacher",))
    e.combo({"method": "sre2l", "teacher": "ConvNetBN"}, True)
    e.combo({"teacher": "ConvNetBN"}, False, ("teacher",))
    e.combo({"metadd_weight": 0.5, "metadd_models": ("ConvNet", "LeNet")}, True)
    e.combo({"metadd_weight": 0.5, "metadd_models": ("ConvNet",)}, False, ("metadd_models",))
    e.combo({"metadd_weight": 0.5, "metadd_models": "ConvNet,LeNet"}, False, ("metadd_models",))
    e.combo({"metadd_models": ("ConvNet", "LeNet")}, False, ("metadd_models", "metadd_weight"))
    e.combo({"metadd_weight": 0.5, "metadd_models": ("ConvNet", "LeNet"), "metadd_alpha": 0.0}, False,
            ("metadd_alpha",))

    def check_classes(num_classes=6, **kw):
        return EngineConfig(**kw).check_classes(num_classes)

    c = Entry("engine.EngineConfig.check_classes", check_classes,
              {"robust_alpha": 0.5, "robust_groups": "all", "classes_per_chunk": None})
    c.combo({"classes_per_chunk": 6}, True).combo({"classes_per_chunk": 9}, True)
    c.combo({"classes_per_chunk": 5}, False, ("robust_groups",))  # groups over every class need one chunk
    c.combo({"robust_groups": "class", "classes_per_chunk": 5}, True)
    return [e, c]


def _model_source_entries() -> list:
    from metadd_fast import model_sources as ms

    def weights():
        import torch

        path = os.path.join(_tmp(), "convnet.pt")
        if not os.path.exists(path):
            from metadd_fast.models import get_model

            torch.save(get_model("ConvNet", 1, 3, (8, 8)).state_dict(), path)
        return path

    def text_file():
        path = os.path.join(_tmp(), "notes.txt")
        with open(path, "w") as f:
            f.write("not weights")
        return path

    w = Lazy(weights, "<weights.pt>")
    spec = Lazy(lambda: ms.ModelSpec("zoo", "ConvNet", weights()), "<ModelSpec ConvNet=weights>")

    return [
        Entry("model_sources.parse_spec", ms.parse_spec, {"text": "ConvNet", "flag": "--teacher"})
        .arg("text", bad=["", "Nope", "torchvision:resnet18", "ConvNet=/nonexistent.pt", "hub:resnet18", 3, None,
                          ":", "ConvNet=", "="], good=["LeNet", Lazy(lambda: "ConvNet=" + weights(), "ConvNet=<w>")],
             names=("--teacher",))
        .arg("flag", bad=[3, None, ""]),
        Entry("model_sources.parse_specs", ms.parse_specs, {"text": "ConvNet,LeNet", "flag": "--metadd-models"})
        .arg("text", bad=["ConvNet,,LeNet", "", 3, None, ["ConvNet"]], good=["ConvNet"], names=("--metadd-models",)),
        Entry("model_sources.read_state_dict", ms.read_state_dict, {"path": w, "flag": "--teacher"})
        .arg("path", bad=["/nonexistent.pt", Lazy(text_file, "<text file>"), 3, None], names=("--teacher",)),
        Entry("model_sources.load_model", ms.load_model,
              {"spec": Lazy(lambda: ms.ModelSpec("zoo", "ConvNet", None), "<ModelSpec ConvNet>"), "flag": "--teacher",
               "channel": 1, "num_classes": 3, "im_size": (8, 8),
               "train": Lazy(lambda: tensor_source(dataset()), "<train>"),
               "cache": Lazy(lambda: os.path.join(_tmp(), "cache.pt"), "<cache>"), "epochs": 1})
        .arg("spec", bad=["ConvNet", None, 3])
        .arg("channel", "count", good=[1], kind_good=False)
        .arg("channel", bad=[3], names=("channel", "train"))  # the real data has 1 channel
        .arg("num_classes", "count", good=[3, 4], kind_good=False)
        .arg("num_classes", bad=[2], names=("num_classes", "train"))  # the real data has 3 classes
        .arg("im_size", bad=[(0, 8), "8", (8,), (8.0, 8), None, (True, 8)], good=[[8, 8], 8])
        .arg("im_size", bad=[(8, 12)], names=("im_size", "train"))  # the real data are 8x8
        .arg("seed", "seed")
        .arg("epochs", "count")
        .arg("train", bad=[3, "x", Lazy(lambda: (lambda: dataset()), "<callable>"), Lazy(dataset, "<Dataset>")])
        .arg("cache", bad=[3])
        .combo({"train": None}, False, ("--teacher",))
        .combo({"spec": spec, "train": None, "cache": None}, True)
        .combo({"spec": spec, "channel": 3}, False, ("--teacher",)),
    ]


def _zca_entries() -> list:
    from metadd_fast.zca import ZCA

    def whiten(x):
        return ZCA.fit(resolve(tensor("randn", 6, 1, 4, 4))).whiten(x)

    def from_state(state):
        return ZCA.from_state_dict(state)

    def good_state():
        return ZCA.fit(resolve(tensor("randn", 6, 1, 4, 4))).state_dict()

    def state_with(**change):
        return Lazy(lambda: {**good_state(), **{k: resolve(v) for k, v in change.items()}}, f"<state {change}>")

    return [
        Entry("zca.ZCA.fit", ZCA.fit, {"images": tensor("randn", 6, 1, 4, 4)})
        .arg("images", bad=[tensor("int", 6, 1, 4, 4), tensor("randn", 6, 16), tensor("randn", 1, 1, 4, 4),
                            tensor("nan", 6, 1, 4, 4), [1.0], None, tensor("randn", 2, 3, 65, 64)])
        .arg("strength", "pfloat")
        .arg("chunk", "count"),
        Entry("zca.ZCA.fit_batches", ZCA.fit_batches,
              {"batches": Lazy(lambda: list(resolve(tensor("randn", 6, 1, 4, 4)).split(4)), "<2 batches>")})
        .arg("batches", bad=[None, 3, [], Lazy(lambda: [resolve(tensor("randn", 1, 1, 4, 4))], "<1 image>"),
                             Lazy(lambda: [resolve(tensor("randn", 3, 1, 4, 4)), resolve(tensor("randn", 3, 1, 4, 5))],
                                  "<2 shapes>"),
                             Lazy(lambda: [resolve(tensor("nan", 6, 1, 4, 4))], "<NaN>"),
                             Lazy(lambda: [resolve(tensor("randn", 2, 3, 65, 64))], "<too large>")])
        .arg("strength", "pfloat"),
        Entry("zca.ZCA.whiten", whiten, {"x": tensor("randn", 2, 1, 4, 4)})
        .arg("x", bad=[tensor("int", 2, 1, 4, 4), tensor("randn", 2, 1, 4, 5), tensor("randn", 2, 16), None],
             good=[tensor("randn", 2, 1, 2, 8)]),
        Entry("zca.ZCA.from_state_dict", from_state, {"state": Lazy(good_state, "<state>")})
        .arg("state", bad=[{}, None, 3, state_with(mean=tensor("randn", 5)), state_with(whiten=tensor("randn", 16)),
                           state_with(strength=tensor("randn", 2))]),
    ]


def _augment_entries() -> list:
    from metadd_fast.augment import DiffAugment

    def call(strategy="color_crop_cutout_flip_scale_rotate", mode="S", x=None, seed=0, siamese=True):
        return DiffAugment(strategy, mode)(x, seed, siamese=siamese)

    return [
        Entry("augment.DiffAugment", call, {"x": tensor("randn", 2, 3, 8, 8)})
        .arg("strategy", bad=["bogus", 3, "", None, "flip__x"], good=["flip", "crop_flip"])
        .arg("mode", bad=["X", 1, None], good=["M"])
        .arg("x", bad=[tensor("int", 2, 3, 8, 8), tensor("randn", 3, 8, 8), [1.0], None,
                       tensor("randn", 0, 3, 8, 8)], good=[tensor("randn", 1, 1, 4, 4)])
        .arg("seed", "seed")
        .arg("siamese", "bool"),
    ]


def _distill_entries() -> list:
    from metadd_fast import distill

    real = Lazy(dataset, "<dataset>")

    def int_dataset():
        from metadd_fast.data import Dataset

        ds = dataset()
        return Dataset("int", ds.images.long(), ds.labels, 3, (0.0,), (1.0,))

    def bad_labels():
        from metadd_fast.data import Dataset

        ds = dataset()
        return Dataset("badlabels", ds.images, ds.labels + 1, 3, (0.0,), (1.0,))

    def metadd():
        from metadd_fast import MetaDDLoss

        return MetaDDLoss([small_net("cam"), small_net("max")])

    mdl = Lazy(metadd, "<MetaDDLoss>")
    embed = Lazy(lambda: (lambda x: x.flatten(1)), "<embedding>")
    entries = []
    for cls, extra in ((distill.DM, {}), (distill.DC, {}),
                       (distill.SRe2L, {"teacher": Lazy(lambda: small_net("bn"), "<BN teacher>")})):
        def make_and_step(cls=cls, **kw):
            d = cls(**kw)
            d.step()
            return d

        e = Entry(f"distill.{cls.__name__}", make_and_step,
                  {"real": real, "ipc": 2, "batch_real": 4, "arch": "ConvNet", "augment": None, **extra})
        e.arg("ipc", "count", bad=[7, 2.0], good=[6])
        e.arg("lr", "pfloat?", good=[])
        e.arg("batch_real", "count", good=[100])
        e.arg("arch", bad=["Nope", 3, None])
        e.arg("init", bad=["zeros", 1, None], good=["noise"])
        e.arg("augment", bad=["bogus", 3, ""], good=["flip"])
        e.arg("seed", "seed", good=[])
        e.arg("device", bad=["gpu", 3], good=["cpu"])
        e.arg("label_offset", bad=[-1, True, 1.5, "0"], good=[0])
        e.arg("real", bad=[None, "digits", tensor("randn", 6, 1, 8, 8), Lazy(int_dataset, "<int images>"),
                           Lazy(bad_labels, "<labels past num_classes>")])
        e.arg("metadd_weight", bad=[-1.0, NAN, INF, True, "1", 0.5], names=("metadd_weight", "metadd"))
        e.arg("metadd", bad=[mdl, 3], names=("metadd",))  # without metadd_weight it does nothing
        e.combo({"metadd": mdl, "metadd_weight": 0.5}, True)
        e.combo({"metadd": 3, "metadd_weight": 0.5}, False, ("metadd",))
        e.combo({"metadd": mdl, "metadd_weight": NAN}, False, ("metadd_weight",))
        e.arg("robust_alpha", "fraction?")
        e.combo({"robust_alpha": 0.5, "robust_weight": 2.0}, True)
        for bad in (0.0, -1.0, NAN, INF, True, "1"):
            e.combo({"robust_alpha": 0.5, "robust_weight": bad}, False, ("robust_weight",))
        e.arg("robust_weight", bad=[2.0])  # without robust_alpha it does nothing
        e.combo({"robust_alpha": 0.5, "embedding": embed}, True)
        e.combo({"robust_alpha": 0.5, "embedding": 3}, False, ("embedding",))
        if cls is distill.DM:  # DM matches in the embedding too
            e.arg("embedding", good=[embed])
        else:  # without robust_alpha it does nothing
            e.arg("embedding", bad=[embed])
        if cls is distill.DC:
            e.arg("outer_loop", "count").arg("lr_net", "pfloat")
            e.arg("inner_steps", bad=[-1, True, 2.5, "3", None, 2 ** 70], good=[0, 1, 2])
            e.combo({"inner_steps": 0, "lr_net": 0.1}, False, ("lr_net",))  # no network training: lr_net does nothing
        if cls is distill.SRe2L:
            e.arg("teacher", bad=[None, 3, Lazy(lambda: small_net("cam"), "<net without BN>"),
                                  Lazy(lambda: small_net("bn", classes=2), "<teacher of 2 classes>")])
            e.arg("r_bn", "nnfloat")
            e.combo({"label_offset": 1}, False, ("label_offset",))  # labels 1..3 past the teacher's 3 classes
        entries.append(e)

    def load(method="DM", ipc=2, state=None):
        cls = getattr(distill, method)
        kw = {"teacher": small_net("bn")} if method == "SRe2L" else {}
        d = cls(dataset(), ipc, batch_real=4, augment=None, **kw)
        d.load_state_dict(resolve(state))
        return d

    def state_of(method="DM", ipc=2, steps=1, change=None):
        def make():
            cls = getattr(distill, method)
            kw = {"teacher": small_net("bn")} if method == "SRe2L" else {}
            d = cls(dataset(), ipc, batch_real=4, augment=None, **kw)
            for _ in range(steps):
                d.step()
            s = d.state_dict()
            s.update({k: resolve(v) for k, v in (change or {}).items()})
            return s
        return Lazy(make, f"<{method} ipc {ipc} state{' ' + str(change) if change else ''}>")

    e = Entry("distill.Distiller.load_state_dict", load, {"state": state_of()})
    e.arg("state", bad=[state_of(ipc=3), {}, None, 3, state_of(change={"iteration": -1}),
                        state_of(change={"iteration": 1.5}), state_of(change={"images": tensor("randn", 6, 1, 8)}),
                        state_of(change={"images": tensor("int", 6, 1, 8, 8)}),
                        state_of(change={"gen": tensor("randn", 4)}), state_of(method="SRe2L")],
          good=[state_of(steps=0)])
    e.combo({"method": "DC", "state": state_of("DC")}, True)
    e.combo({"method": "DC", "state": state_of("DC", steps=0)}, True)
    e.combo({"method": "DC", "state": state_of("DC", change={"net": {"x": tensor("randn", 2)}})}, False, ("state",))
    e.combo({"method": "SRe2L", "state": state_of("SRe2L")}, True)
    e.combo({"method": "SRe2L", "state": state_of("DM")}, False, ("state",))
    entries.append(e)
    return entries


def _metadd_entries() -> list:
    import metadd_fast as mf

    nets = Lazy(lambda: [small_net("cam"), small_net("max")], "<2 ConvNets>")
    x = tensor("randn", 4, 1, 8, 8)
    y = labels(0, 1, 2, 0)

    def loss(images=None, labels=None, groups=None, **kw):
        import torch

        m = mf.MetaDDLoss(**kw)
        images = images.clone().requires_grad_() if isinstance(images, torch.Tensor) and \
            images.is_floating_point() else images
        return m(images, labels, groups) if groups is not None else m(images, labels)

    e = Entry("MetaDDLoss", loss, {"models": nets, "images": x, "labels": y})
    e.arg("models", bad=[Lazy(lambda: [small_net()], "<1 net>"), Lazy(small_net, "<a net>"), [3, 4], None,
                         Lazy(lambda: [small_net(), small_net(classes=2)], "<nets of 3 and 2 classes>")])
    e.arg("eps", bad=[-1.0, NAN, INF, True, "0.1"], good=[1e-6, 0.0])
    e.arg("relu", "bool")
    e.arg("out_size", bad=[0, -3, (0, 4), "4", 4.5, True, (4,), 10 ** 6], good=[None, 4, (4, 6)])
    e.arg("mode", bad=["x", 1, None], good=["gradcam"])
    e.arg("memory", bad=["x", None], good=["keep"])
    e.arg("norm", bad=["x", None])
    e.arg("alpha", "fraction?")
    e.arg("chunk_size", "count?")
    e.arg("memory_budget", "pfloat?", good=[])
    e.arg("backend", bad=["bogus", 3, "cuda"], good=["reference"])
    e.arg("images", bad=[tensor("int", 4, 1, 8, 8), tensor("randn", 4, 3, 8, 8), tensor("randn", 1, 8, 8),
                         tensor("randn", 0, 1, 8, 8), None, [1.0], tensor("randn", 4, 1, 12, 10)])
    e.arg("labels", bad=[labels(0, 1, 2, 3), labels(0, 1), tensor("randn", 4), labels(-1, 0, 1, 2), None, [0, 1, 2, 0]])
    e.combo({"images": tensor("randn", 1, 1, 8, 8), "labels": labels(2)}, True)
    e.combo({"groups": labels(0, 1, 0, 1)}, False, ("groups", "alpha"))  # groups do nothing without alpha
    e.combo({"alpha": 0.5, "groups": labels(0, 1, 0, 1)}, True)
    e.combo({"alpha": 0.5, "groups": labels(0, 1)}, False, ("groups",))
    e.combo({"alpha": 0.5, "groups": tensor("randn", 4)}, False, ("groups",))
    e.combo({"alpha": 0.5, "groups": labels(0, 1, 0, -1)}, False, ("groups",))
    e.combo({"num_groups": 2}, False, ("num_groups", "alpha"))
    e.combo({"alpha": 0.5, "groups": labels(0, 1, 0, 1), "num_groups": 0}, False, ("num_groups",))
    e.combo({"memory": "keep", "memory_budget": 10.0}, False, ("memory_budget",))
    e.combo({"memory": "keep", "chunk_size": 2}, False, ("chunk_size",))

    def target(model=None, layer=None, head=None, images=None, labels=None):
        return mf.cam_target(model, layer, head)

    t = Entry("cam_target", target, {"model": Lazy(small_net, "<ConvNet>")})
    t.arg("model", bad=[None, 3, "ConvNet"])
    t.arg("layer", bad=["nope", 3], good=["features", None])
    t.arg("head", bad=["nope", 3], good=["classifier"])
    return [e, t]


def _ops_entries() -> list:
    import metadd_fast as mf
    from metadd_fast.models import get_model

    v = tensor("randn", 8)
    return [
        Entry("cvar", mf.cvar, {"values": v, "alpha": 0.5})
        .arg("alpha", bad=[0.0, 1.5, NAN, True, "0.5", None], good=[1])
        .arg("values", bad=[tensor("int", 8), tensor("randn", 2, 4), tensor("randn", 0), None])
        .combo({"groups": labels(0, 1, 0, 1, 0, 1, 0, 1)}, True)
        .combo({"groups": labels(0, 1, 0, 1, 0, 1, 0, 1), "num_groups": 0}, False, ("num_groups",))
        .combo({"groups": labels(0, 1, 0, 1, 0, 1, 0, 1), "num_groups": True}, False, ("num_groups",))
        .combo({"groups": labels(0, 1), "num_groups": 2}, False, ("groups",))
        .combo({"groups": labels(0, 1, 0, 1, 0, 1, 0, 9), "num_groups": 2}, False, ("groups",)),
        Entry("nearest_centroid", mf.nearest_centroid, {"x": tensor("randn", 5, 3), "centroids": tensor("randn", 2, 3)})
        .arg("x", bad=[tensor("int", 5, 3), tensor("randn", 5, 4), tensor("randn", 5), None])
        .arg("centroids", bad=[tensor("int", 2, 3), tensor("randn", 0, 3), None])
        .arg("backend", bad=["bogus", 0], good=["reference"]),
        Entry("models.get_model", get_model,
              {"name": "ConvNet", "channel": 1, "num_classes": 3, "im_size": (16, 16)})
        .arg("name", bad=["Nope", 3, None], good=["LeNet"])
        .arg("channel", "count")
        .arg("num_classes", "count")
        .arg("im_size", bad=[(0, 16), "16", (16,), (16.5, 16), None, (1, 1), (2 ** 20, 16)],
             good=[[16, 16], (16, 24), 16]),
    ]


def _canaries() -> list:
    """Cases with known outcomes, one per kind, to test the harness itself (FUZZ_API_CANARIES=1)."""
    def fail(kind):
        def run():
            raise kind("x: bad")
        return run

    return [Case("canary", "ok", True, lambda: None),
            Case("canary", "crash", True, fail(KeyError)),
            Case("canary", "died", True, lambda: os.abort()),
            Case("canary", "hang", True, lambda: __import__("time").sleep(600)),
            Case("canary", "silent", False, lambda: None, ("x",)),
            Case("canary", "refused", True, fail(ValueError)),
            Case("canary", "unnamed", False, fail(TypeError), ("y",)),
            Case("canary", "ok after", False, fail(ValueError), ("x",))]


def _training_entries() -> list:
    from metadd_fast import training
    from metadd_fast.augment import DiffAugment

    net = Lazy(lambda: small_net(), "<ConvNet>")
    base = {"model": net, "images": tensor("randn", 6, 1, 8, 8), "labels": labels(0, 1, 2, 0, 1, 2), "epochs": 1}
    return [
        Entry("training.train_model", training.train_model, base)
        .arg("model", bad=[None, 3])
        .arg("images", bad=[tensor("int", 6, 1, 8, 8), tensor("randn", 6, 8, 8), tensor("nan", 6, 1, 8, 8), None,
                            "x"], good=[Lazy(lambda: tensor_source(dataset(2, 3)), "<TensorSource>")])
        .arg("labels", bad=[labels(0, 1), tensor("randn", 6), None])
        .arg("epochs", bad=[-1, True, 2.5, "3", None, 2 ** 70], good=[0])
        .arg("lr", "pfloat", good=[0.1], kind_good=False)
        .arg("batch_size", "count")
        .arg("augment", bad=["flip", 3], good=[None, Lazy(lambda: DiffAugment("flip"), "<DiffAugment>")])
        .arg("seed", "seed", good=[])
        .arg("progress", "bool", good=[False]),
        Entry("training.predict", training.predict, {"model": net, "images": tensor("randn", 6, 1, 8, 8)})
        .arg("model", bad=[None, "net"])
        .arg("images", bad=[tensor("int", 6, 1, 8, 8), tensor("randn", 0, 1, 8, 8), None])
        .arg("batch_size", "count"),
    ]


def cases() -> list:
    """Every case, in a fixed order (only the harness's canaries with FUZZ_API_CANARIES=1)."""
    if os.environ.get("FUZZ_API_CANARIES") == "1":
        return _canaries()
    out = []
    for group in (_data_entries, _kmeans_entries, _grouping_entries, _evaluate_entries, _engine_entries,
                  _model_source_entries, _zca_entries, _augment_entries, _distill_entries, _metadd_entries,
                  _ops_entries, _training_entries):
        for entry in group():
            out += entry.cases
    return out


def _message(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def run_case(case: Case) -> dict:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            case.run()
    except (TypeError, ValueError) as err:
        return {"outcome": "refused", "error": _message(err)}
    except BaseException as err:  # noqa: BLE001 (every other exception is a crash)
        return {"outcome": "crashed", "error": _message(err)}
    return {"outcome": "accepted"}


def main(argv) -> int:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--stop", type=int, default=None)
    p.add_argument("--step", type=int, default=1)
    p.add_argument("--list", action="store_true")
    a = p.parse_args(argv)
    all_cases = cases()
    if os.environ.get("FUZZ_API_CANARIES") != "1":
        import torch

        torch.set_num_threads(1)
    if a.list:
        for i, c in enumerate(all_cases):
            print(i, "valid" if c.valid else "invalid", c.id)
        return 0
    for i in range(a.start, len(all_cases) if a.stop is None else a.stop, a.step):
        print(json.dumps({"id": i, "event": "start"}), flush=True)
        print(json.dumps({"id": i, **run_case(all_cases[i])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
