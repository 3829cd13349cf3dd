"""Checks of the command line's arguments, all run before any work starts.

Two layers, both ending in one line ``metadd-fast <command>: argument --flag: expected ...,
got ...`` and exit status 2, with no traceback:

- ``type=`` functions for argparse check one flag's value as it is parsed
  (``positive_int``, ``finite_float``, ``alpha_or_none``, ``model_names``, ...);
- ``check_*`` functions check flags together, against the file system and against the
  data set and synthetic set, raising :class:`~metadd_fast.errors.InputError` through
  :func:`flag_error`; :class:`OneLineParser` and the command line print both the same way.

To check a new flag: give it a ``type=`` from here, and add its consistency checks to the
``check_*`` function of its command.
"""
from __future__ import annotations

import argparse
import math
import os

from .errors import InputError

__all__ = ["OneLineParser", "flag_error", "positive_int", "seed_int", "image_size", "finite_float",
           "positive_float", "nonnegative_float", "alpha_or_none", "model_name", "model_names", "recipe_name",
           "check_out", "check_new_file", "check_data_flags", "check_distill", "check_evaluate", "check_export",
           "check_train_data", "check_synthetic", "check_models"]

MAX_SEED = 2 ** 32


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def flag_error(flag: str, message: str) -> InputError:
    """The error for a bad ``flag`` (e.g. "--ipc"), worded as argparse words its own."""
    return InputError(f"argument {flag}: {message}")


def _parse(kind, text: str, expected: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _int_in(text: str, low: int, high: int, expected: str) -> int:
    value = _parse(int, text, expected)
    if not low <= value < high:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An int >= 1 (counts: iterations, ipc, batch sizes, seeds, epochs, chunk sizes)."""
    return _int_in(text, 1, 1 << 62, "a positive int")


def seed_int(text: str) -> int:
    """A random seed: an int in [0, 2**32)."""
    return _int_in(text, 0, MAX_SEED, f"an int in [0, {MAX_SEED})")


def image_size(text: str) -> int:
    """An image side in pixels: an int in [8, 1024]."""
    return _int_in(text, 8, 1025, "an int in [8, 1024]")


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite."""
    value = _parse(float, text, "a finite float")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite float, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (learning rates)."""
    value = _parse(float, text, "a finite float > 0")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite float > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite float >= 0 (loss weights; 0 turns the term off)."""
    value = _parse(float, text, "a finite float >= 0")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite float >= 0, got {text!r}")
    return value


def alpha_or_none(text: str):
    """A CVaR tail in (0, 1], or ``none`` (None: the plain mean)."""
    if text.strip().lower() in ("none", ""):
        return None
    value = _parse(float, text, "a float in (0, 1] or none")
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a float in (0, 1] or none, got {text!r}")
    return value


def model_name(text: str) -> str:
    """The name of a zoo network (metadd_fast.models.MODELS)."""
    from .models import MODELS

    if text not in MODELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(MODELS)}, got {text!r}")
    return text


def model_names(text: str) -> tuple:
    """Comma-separated zoo network names, at least one, none twice."""
    names = tuple(n.strip() for n in text.split(","))
    for n in names:
        model_name(n)
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names, got {text!r}")
    return names


def model_spec(text: str) -> str:
    """A network spec ``[SOURCE:]ARCH[=PATH]`` (metadd_fast.model_sources): a zoo name, or a
    zoo/torchvision/timm architecture with a local state_dict file."""
    from .model_sources import parse_spec

    try:
        parse_spec(text, "spec")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).partition(": ")[2]) from None
    return text.strip()


def model_specs(text: str) -> tuple:
    """Comma-separated network specs (see :func:`model_spec`), none twice."""
    specs = tuple(model_spec(part) for part in text.split(","))
    if len(set(specs)) != len(specs):
        raise argparse.ArgumentTypeError(f"expected distinct names, got {text!r}")
    return specs


def _zoo_names(specs) -> list:
    """The zoo architectures among network specs."""
    from .model_sources import parse_spec

    return [spec.arch for spec in (parse_spec(s, "spec") for s in specs) if spec.source == "zoo"]


def recipe_name(text: str) -> str:
    """The name of an evaluation recipe (metadd_fast.recipes.RECIPES)."""
    from .recipes import RECIPES

    if text not in RECIPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(RECIPES)}, got {text!r}")
    return text


def check_out(flag: str, out: str) -> None:
    """``out`` can be the output folder: a folder, or a path that can be created as one."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise flag_error(flag, f"expected a folder, got {out!r}, an existing file")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise flag_error(flag, f"cannot create a folder {out!r}: {parent!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise flag_error(flag, f"cannot write in {parent!r} (permission denied)")


def check_new_file(flag: str, path: str) -> None:
    """``path`` can be written as a file: not a folder, in a folder that exists."""
    if os.path.isdir(path):
        raise flag_error(flag, f"expected a file name, got {path!r}, a folder")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise flag_error(flag, f"folder {parent!r} does not exist")


def check_data_flags(args) -> None:
    """--dataset, --data-path and --size together; fills in the default --size."""
    if args.dataset == "digits":
        if args.data_path is not None:
            raise flag_error("--data-path", "digits is embedded and takes no --data-path")
        args.size = 16 if args.size is None else args.size
        return
    if args.data_path is None:
        raise flag_error("--data-path", f"--dataset {args.dataset} needs the path of its local copy")
    if not os.path.exists(args.data_path):
        raise flag_error("--data-path", f"{args.data_path!r} does not exist")
    if args.dataset == "folder" and not os.path.isdir(args.data_path):
        raise flag_error("--data-path", f"--dataset folder expects a folder of class sub-folders, "
                                        f"got {args.data_path!r}, a file")
    if args.dataset in ("cifar10", "cifar100") and args.size not in (None, 32):
        raise flag_error("--size", f"{args.dataset} images are 32x32 and are not resized; leave --size out, "
                                   f"got {args.size}")


def check_distill(args) -> None:
    """Everything ``distill`` can check before loading data: flags together and --out."""
    check_data_flags(args)
    check_out("--out", args.out)
    if args.restart and args.resume:
        raise flag_error("--resume", "--resume continues a run and --restart discards it; give one of them")
    if args.resume and not any(os.path.exists(os.path.join(args.out, f)) for f in ("config.json", "run.json")):
        raise flag_error("--resume", f"{args.out} holds no run to continue")
    if args.metadd_weight == 0:
        for flag, value in (("--metadd-models", args.metadd_models), ("--metadd-alpha", args.metadd_alpha),
                            ("--metadd-precision", None if args.metadd_precision == "fp32" else args.metadd_precision)):
            if value is not None:
                raise flag_error(flag, "has no effect without --metadd-weight > 0")
    elif args.metadd_models is not None and len(args.metadd_models) < 2:
        raise flag_error("--metadd-models", f"expected at least 2 networks (MetaDD's variance is across "
                                            f"architectures), got {','.join(args.metadd_models)}")
    if args.robust_alpha is None and args.robust_weight != 1.0:
        raise flag_error("--robust-weight", "has no effect without --robust-alpha")
    if args.robust_alpha is None and args.robust_groups != "class":
        raise flag_error("--robust-groups", "has no effect without --robust-alpha")
    if args.classes_per_chunk is None and args.cvar_chunks != 1:
        raise flag_error("--cvar-chunks", "applies to the large-IPC engine only; add --classes-per-chunk")
    if args.zca and args.dataset == "folder" and args.size is not None:  # before the folder is opened
        _check_zca((3, args.size, args.size))
    if args.teacher is not None and args.method != "sre2l":
        raise flag_error("--teacher", f"only --method sre2l uses a teacher, got --method {args.method}")
    if args.cvar_chunks != 1 and args.robust_alpha is None:
        raise flag_error("--cvar-chunks", "couples chunks under robust DD's CVaR; add --robust-alpha")
    if args.device is not None:
        _check_device(args.device)
    if args.rank_timeout is not None and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise flag_error("--rank-timeout", "applies to distributed runs only (torchrun with more than one process)")
    if args.pin_memory and (args.device is None or not args.device.startswith("cuda")):
        raise flag_error("--pin-memory", f"pinned host memory serves a CUDA --device, got "
                                         f"{args.device or 'none (cpu)'}")


def _check_device(text: str) -> None:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise flag_error("--device", f"expected a device such as cpu or cuda:0, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise flag_error("--device", f"{text} asked for, but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise flag_error("--device", f"expected cpu or cuda[:index], got {text!r}")


def check_evaluate(args) -> None:
    """Everything ``evaluate`` can check before loading data."""
    check_data_flags(args)
    if not os.path.isfile(args.synthetic):
        raise flag_error("--synthetic", f"{args.synthetic!r} is not a file")
    if args.json is not None:
        check_new_file("--json", args.json)
    if args.temperature is not None and args.soft_labels is None:
        raise flag_error("--temperature", "has no effect without --soft-labels")


def check_export(args) -> None:
    """Everything ``export`` can check before reading the synthetic set."""
    check_data_flags(args)
    if not os.path.isfile(args.synthetic):
        raise flag_error("--synthetic", f"{args.synthetic!r} is not a file")
    if args.format == "imagefolder":
        check_out("--out", args.out)
    else:
        check_new_file("--out", args.out)


def check_models(flag: str, names, shape, num_classes: int) -> None:
    """Each zoo network of ``names`` can be built for images of ``shape`` (C, H, W) and
    ``num_classes`` classes (some need larger images)."""
    from .models import get_model

    channel, h, w = shape
    for name in names:
        try:
            get_model(name, channel, num_classes, (h, w))
        except (RuntimeError, ValueError) as err:  # a map pooled below 1x1, or a 1x1 map normalized
            raise flag_error(flag, f"{name} cannot take {channel}x{h}x{w} images "
                                   f"({str(err).splitlines()[0]})") from None


def _check_zca(shape) -> None:
    """--zca on images of ``shape`` (C, H, W): their C*H*W x C*H*W covariance must fit
    (:func:`metadd_fast.zca.check_features`)."""
    from .zca import check_features

    try:
        check_features("--zca", shape)
    except InputError as err:
        raise flag_error("--zca", str(err).partition(": ")[2]) from None


def check_train_data(args, source) -> None:
    """``distill``'s flags against its training split's index (a :class:`metadd_fast.sources.Source`;
    no image is read): enough real images per class for --ipc, networks that take its images,
    and images small enough for --zca."""
    counts = list(source.counts)
    if min(counts) == 0:
        raise flag_error("--data-path", f"class {counts.index(0)} of {source.name} has no training images")
    if min(counts) < args.ipc:
        raise flag_error("--ipc", f"at most {min(counts)} (the fewest real images of a class in {source.name}: "
                                  f"class {counts.index(min(counts))}), got {args.ipc}")
    check_models("--arch", [args.arch], source.shape, source.num_classes)
    if args.metadd_weight:
        check_models("--metadd-models", _zoo_names(args.metadd_models or ()), source.shape, source.num_classes)
    if args.zca:
        _check_zca(source.shape)


def check_synthetic(args, images, labels, test) -> None:
    """``evaluate``'s (or ``export``'s) synthetic set against the data set's split (a Dataset or
    a class source): same image shape, labels in range, and networks (``--archs``, if the
    command has it) that take its images."""
    from .evaluate import test_info

    num_classes, shape, _ = test_info(test)
    if tuple(images.shape[1:]) != shape:
        raise flag_error("--synthetic", f"{args.synthetic} holds {'x'.join(map(str, images.shape[1:]))} images, "
                                        f"but --dataset {test.name} gives "
                                        f"{'x'.join(map(str, shape))} (channels x height x width)")
    if int(labels.max()) >= num_classes:
        raise flag_error("--synthetic", f"{args.synthetic} has label {int(labels.max())}, but --dataset "
                                        f"{test.name} has classes 0..{num_classes - 1}")
    if getattr(args, "archs", None):
        check_models("--archs", args.archs, shape, num_classes)
