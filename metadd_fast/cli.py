"""The ``metadd-fast`` command line: distill, evaluate, export, bench, demo, study, info."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import warnings

from . import cli_args as ca
from .errors import InputError, SaveError

__all__ = ["main"]


def _add_distill(sub):
    p = sub.add_parser("distill", help="distill a dataset into a small synthetic set (resumable)",
                       description="Distill a dataset. The output folder holds run.json (the run's configuration "
                                   "and the settings the result depends on: seed, threads, versions, ...), checkpoints "
                                   "(state.pt, every --checkpoint-every steps) and, at the end, synthetic.pt "
                                   "(DC's format) and PNGs. Re-running the same command continues an "
                                   "interrupted run; --restart discards it.")
    _add_data_flags(p)
    p.add_argument("--method", default="dm", choices=["dm", "dc", "sre2l"], help="distillation method")
    p.add_argument("--ipc", type=ca.positive_int, default=10, help="synthetic images per class")
    p.add_argument("--iterations", type=ca.positive_int, default=200, help="synthetic-image updates")
    p.add_argument("--lr", type=ca.positive_float, default=None, help="image learning rate (default: the method's)")
    p.add_argument("--batch-real", type=ca.positive_int, default=128, help="real images per class per step")
    p.add_argument("--arch", type=ca.model_name, default="ConvNet", help="network the method matches through")
    p.add_argument("--metadd-weight", type=ca.nonnegative_float, default=0.0,
                   help="weight of the MetaDD term (0: off)")
    p.add_argument("--metadd-models", type=ca.model_specs, default=None,
                   help="comma-separated networks (at least 2) for MetaDD (default ConvNet,ConvNetD1,AlexNet,LeNet: "
                        "zoo networks trained on the real data); each may be "
                        "[torchvision:|timm:]ARCH=PATH, a state_dict file (read with weights_only=True)")
    p.add_argument("--metadd-alpha", type=ca.alpha_or_none, default=None,
                   help="CVaR tail in (0, 1] of the MetaDD term over synthetic images (none: mean)")
    p.add_argument("--metadd-precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="precision of the MetaDD networks: fp32, or bf16/fp16 under torch.autocast (the CAM "
                        "math stays float32; docs/precision.md); large-IPC engine only")
    p.add_argument("--robust-alpha", type=ca.alpha_or_none, default=None,
                   help="robust DD: CVaR tail in (0, 1] over groups of real images (each the real images "
                        "nearest one synthetic image: --robust-groups)")
    p.add_argument("--robust-groups", choices=["class", "all"], default="class",
                   help="robust DD groups: nearest synthetic image of the class, or of any class (the public "
                        "code; needs one chunk: no --classes-per-chunk below the number of classes)")
    p.add_argument("--robust-weight", type=ca.positive_float, default=1.0,
                   help="robust DD: the CVaR term's weight (times the number of classes), added to the method's loss")
    p.add_argument("--zca", action="store_true",
                   help="distill in regularised-ZCA space fitted on the train images (CIFAR-style runs, as "
                        "MTT/KIP); synthetic.pt is saved un-whitened, the transform in zca.pt")
    p.add_argument("--seed", type=ca.seed_int, default=0)
    p.add_argument("--checkpoint-every", type=ca.positive_int, default=25, help="steps between checkpoints")
    p.add_argument("--out", required=True, help="output folder (resumed if it holds this run)")
    p.add_argument("--restart", action="store_true", help="discard a previous run in --out")
    p.add_argument("--resume", action="store_true", help="require a previous run in --out to continue")
    p.add_argument("--classes-per-chunk", type=ca.positive_int, default=None,
                   help="large-IPC engine (dm, dc, sre2l): optimize this many classes at a time into a "
                        "memory-mapped synthetic set, one checkpoint per chunk; under torchrun the chunks are "
                        "sharded across ranks (gloo on CPU, NCCL on GPU) and rank 0 writes the result")
    p.add_argument("--cvar-chunks", type=ca.positive_int, default=1,
                   help="large-IPC engine with --robust-alpha: chunks optimized together under one CVaR over "
                        "all their groups (split across ranks; a multiple of the world size)")
    p.add_argument("--teacher", type=ca.model_spec, default=None,
                   help="sre2l: the teacher, [torchvision:|timm:]ARCH=PATH (a state_dict "
                        "file) or a zoo ARCH trained on the real data (default ConvNetBN)")
    p.add_argument("--device", default=None,
                   help="device of the chunk being optimized (default: cpu; under torchrun "
                        "on GPUs, cuda:<local rank>)")
    p.add_argument("--pin-memory", action="store_true",
                   help="keep each chunk's real images in pinned host memory (CUDA)")
    p.add_argument("--threads", type=ca.positive_int, default=None,
                   help="intra-op CPU threads of the run, on every rank (default: torch's, which is every core "
                        "in a plain process and 1 under torchrun); results are bit-identical only at equal "
                        "thread counts (run.json records them)")
    p.add_argument("--rank-timeout", type=ca.positive_float, default=None,
                   help="under torchrun: seconds a rank waits for the others at a collective "
                        "before it stops, naming the rank that did not answer (default 1800; more than one "
                        "chunk's time: ranks wait for the slowest at the end)")


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="train fresh zoo networks on a synthetic set and test them",
                       description="Cross-architecture evaluation: for each architecture and seed, train a "
                                   "fresh network on the synthetic set under --recipe (default: SGD, momentum 0.9, "
                                   "wd 5e-4, lr/10 at half, DSA, 300 epochs), with hard labels or a teacher's soft "
                                   "labels, test on the real test split (read in batches); mean +- std, and "
                                   "worst-group accuracy over k-means clusters of the test set (docs/evaluation.md).")
    p.add_argument("--synthetic", required=True, help="a synthetic.pt in DC's format")
    _add_data_flags(p)
    p.add_argument("--archs", type=ca.model_names, default="ConvNet,ConvNetD2,AlexNet,LeNet",
                   help="comma-separated zoo networks")
    p.add_argument("--seeds", type=ca.positive_int, default=3)
    p.add_argument("--epochs", type=ca.positive_int, default=None, help="training epochs (default: the recipe's)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--recipe", type=ca.recipe_name, default="default",
                   help="evaluation recipe: default (SGD, DSA, 300 epochs), dc, dm, sre2l-imagenet, sre2l-tiny "
                        "(docs/evaluation.md); "
                        "--epochs, --lr, --batch-size, --temperature and --cutmix override it")
    p.add_argument("--lr", type=ca.positive_float, default=None, help="learning rate (default: the recipe's)")
    p.add_argument("--batch-size", type=ca.positive_int, default=None, help="batch size (default: the recipe's)")
    p.add_argument("--soft-labels", type=ca.model_spec, default=None, metavar="TEACHER",
                   help="train on the soft labels of this teacher ([torchvision:|timm:]ARCH=PATH, a state_dict "
                        "file, or a zoo ARCH trained on the real data and cached in <synthetic's folder>/models/): "
                        "KL to its outputs at --temperature on the same augmented images")
    p.add_argument("--temperature", type=ca.positive_float, default=None,
                   help="soft labels' temperature T > 0 (default: the recipe's)")
    p.add_argument("--cutmix", type=ca.nonnegative_float, default=None, metavar="ALPHA",
                   help="CutMix's Beta parameter, 0 off (default: the recipe's)")


def _add_export(sub):
    p = sub.add_parser("export", help="write a synthetic set as SRe2L's PNG folder or DD-Ranking's tensors",
                       description="--format imagefolder: PNGs in SRe2L's layout OUT/new{class:03d}/"
                                   "class{class:03d}_id{i:03d}.png, de-normalized with --dataset's statistics "
                                   "to 8 bits; --format tensors: one file {'images', 'labels'} for DD-Ranking's "
                                   "Python API.")
    p.add_argument("--synthetic", required=True, help="a synthetic.pt in DC's format")
    p.add_argument("--format", required=True, choices=["imagefolder", "tensors"])
    p.add_argument("--out", required=True, help="the folder (imagefolder) or file (tensors) to write")
    _add_data_flags(p)


def _add_data_flags(p):
    p.add_argument("--dataset", default="digits", choices=["digits", "cifar10", "cifar100", "folder"],
                   help="digits (embedded), cifar10, cifar100 or folder (class sub-folders of images)")
    p.add_argument("--data-path", default=None, help="local path of cifar batches or an image folder root")
    p.add_argument("--size", type=ca.image_size, default=None,
                   help="image size in [8, 1024] for digits (default 16) or folders (default: the first image's)")


def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmark every op: eager vs torch.compile vs fused",
                       description="Runs benchmarks/run.py of a source checkout: timings, peak memory and "
                                   "bandwidth, appended to benchmarks/results/results.csv.")
    p.add_argument("--quick", action="store_true", help="the small workloads only (a few minutes on a CPU)")
    p.add_argument("--ops", nargs="+", default=None, help="ops to run (default: all)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")


def _add_comparison(sub, name: str):
    """``demo`` and ``study``: one runner (metadd_fast/study.py); every flag defaults to the preset's value."""
    what = {"demo": "the demo: the study's comparison at small settings (about 2 minutes on 2 cores)",
            "study": "the comparison with more seeds, iterations and evaluation epochs, DSA in evaluation; resumable"}
    p = sub.add_parser(name, help=f"MetaDD and Robust DD against baselines on digits 32x32 with an inverted "
                                  f"minority: {what[name]}",
                       description="Digits at 32x32, 10% of each class inverted. Variants paired by seed (same "
                                   "initial images): initial images, random real, k-center coreset, DM, +MetaDD, "
                                   "+Robust DD, +both. Measures accuracy on held-out networks (whole test set, "
                                   "minority, majority) and CAM variance under the MetaDD networks and under "
                                   "held-out CAM networks; writes results.md, results.json, results.png and the "
                                   "cells (each saved when finished: the same command resumes) to --out.")
    p.add_argument("--out", default=f"{name}_out")
    p.add_argument("--seeds", type=ca.positive_int, help="distillation seeds (cells per variant)")
    p.add_argument("--iterations", type=ca.positive_int, help="DM updates per cell")
    p.add_argument("--ipc", type=ca.positive_int, help="synthetic images per class")
    p.add_argument("--eval-seeds", type=ca.positive_int, help="evaluation seeds per set and network")
    p.add_argument("--eval-epochs", type=ca.positive_int, help="evaluation training epochs")
    p.add_argument("--eval-augment", help="DSA strategy while training evaluation networks, or 'none'")
    p.add_argument("--eval-archs", help="comma-separated held-out evaluation networks")
    p.add_argument("--metadd-fraction", type=ca.positive_float,
                   help="MetaDD weight: its gradient on the initial images as a fraction of the method's")
    p.add_argument("--robust-alpha", type=ca.alpha_or_none, help="Robust DD's CVaR tail fraction")
    p.add_argument("--robust-groups", choices=["class", "all"],
                   help="Robust DD groups: nearest synthetic image of the class, or of any class (the public code)")
    p.add_argument("--variants", help="comma-separated variants")
    p.add_argument("--limit-per-class", type=ca.positive_int, help="keep n images per class (CI-sized runs)")
    p.add_argument("--pretrain-target", type=ca.positive_float, help="validation accuracy that ends pre-training")
    p.add_argument("--pretrain-max-epochs", type=ca.positive_int, help="pre-training epochs at most")


def _info() -> dict:
    import torch

    from . import __version__
    from .ops import backends

    info = {"metadd_fast": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["triton_interpret"] = backends.triton_interpreting()
    for name in ("cpp", "triton"):
        info[f"backend_{name}"] = "available" if backends.available(name) else f"missing: {backends.unavailable_reason(name)}"
    return info


def _bench(args) -> int:
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "run.py")
    if not os.path.exists(script):
        print("metadd-fast bench needs a source checkout (benchmarks/run.py next to the package)", file=sys.stderr)
        return 2
    cmd = [sys.executable, script]
    if args.quick:
        cmd += ["--quick"]
    if args.ops:
        cmd += ["--ops", *args.ops]
    if args.device:
        cmd += ["--device", args.device]
    return subprocess.call(cmd)


def _as_flag_error(err: ValueError) -> InputError:
    """The engine's ValueError or InputError ("field: message", naming EngineConfig fields) as
    the CLI's one-line error naming flags; any other InputError (a file or the data named) is
    said as it is; any other ValueError is a bug and is raised as it is."""
    from .engine import EngineConfig

    fields = EngineConfig.__dataclass_fields__
    field, sep, rest = str(err).partition(": ")
    if not sep or field not in fields:
        if isinstance(err, InputError):
            return err
        raise err
    rest = re.sub(r"\b([a-z]+(?:_[a-z]+)+)\b", lambda m: f"--{m[1].replace('_', '-')}" if m[1] in fields else m[1],
                  rest)
    return ca.flag_error(f"--{field.replace('_', '-')}", rest)


DEFAULT_METADD_MODELS = ("ConvNet", "ConvNetD1", "AlexNet", "LeNet")  # zoo networks trained on the real data


def _engine_config(args, device):
    from .engine import EngineConfig

    teacher = args.teacher if args.teacher is not None or args.method != "sre2l" else "ConvNetBN"
    return EngineConfig(method=args.method, ipc=args.ipc, iterations=args.iterations,
                        classes_per_chunk=args.classes_per_chunk, batch_real=args.batch_real, arch=args.arch,
                        lr=args.lr, seed=args.seed, robust_alpha=args.robust_alpha, robust_weight=args.robust_weight,
                        robust_groups=args.robust_groups, cvar_chunks=args.cvar_chunks,
                        metadd_weight=args.metadd_weight, metadd_alpha=args.metadd_alpha,
                        metadd_precision=args.metadd_precision, teacher=teacher,
                        metadd_models=tuple(args.metadd_models) if args.metadd_weight else (),
                        zca=args.zca, checkpoint_every=args.checkpoint_every, device=device,
                        pin_memory=args.pin_memory)


def _distill(args) -> int:
    """One runner (the engine; without --classes-per-chunk one chunk of every class). Every flag,
    network spec and weights file is checked against the data's index before any image is read."""
    import torch
    import torch.distributed as dist

    from .engine import run_chunked
    from .ranks import RankFailure, init_from_env
    from .sources import open_source

    ca.check_distill(args)
    if args.metadd_weight and args.metadd_models is None:
        args.metadd_models = DEFAULT_METADD_MODELS
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        init_from_env("nccl" if torch.cuda.is_available() else "gloo", args.rank_timeout or 1800.0)
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    cfg = _engine_config(args, device)
    try:
        try:
            cfg.check(dist.get_world_size() if dist.is_initialized() else 1)
            if args.restart:
                _discard_run(args.out)
            source = open_source(args.dataset, "train", path=args.data_path, size=args.size, index_dir=args.out)
            ca.check_train_data(args, source)
            _warn_zoo_training(cfg, source)
            run = run_chunked(cfg, source, args.out)
        except ValueError as err:  # the engine names its config fields: say them as flags
            raise _as_flag_error(err) from err
        except RankFailure as err:  # a rank died or hung: one line naming it
            print(f"metadd-fast distill: {err}", file=sys.stderr)
            return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if run is not None:
        print(f"wrote {os.path.join(args.out, 'synthetic.pt')} ({run['seconds']:.0f} s)")
    return 0


def _warn_zoo_training(cfg, source) -> None:
    """One line when zoo networks without a weights file are to be trained on an image folder
    (each epoch decodes every image of it once)."""
    from .sources import ImageFolderSource

    untrained = [str(spec) for _, spec in cfg.specs() if spec.path is None]
    if untrained and isinstance(source, ImageFolderSource):
        warnings.warn(f"{', '.join(untrained)}: no weights file, so trained on {source.name} here unless cached in "
                      f"--out's models/ ({cfg.pretrain_epochs} epochs, each decoding every image once); give "
                      f"ARCH=PATH weights files to skip it")


RUN_FILES = ("config.json", "state.pt", "synthetic.pt", "run.json", "synthetic.f32", "groups.pt", "zca.pt",
             "synthetic.png", "cams.png")


def _discard_run(out: str) -> None:
    """--restart: remove a previous run's files from ``out`` (and nothing else; cached networks
    and the data index are kept: they are checked against what they were made from)."""
    import glob
    import shutil

    for f in RUN_FILES:
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    for f in glob.glob(os.path.join(glob.escape(out), "state.rank*.pt")):
        os.remove(f)
    for folder in ("chunks", "ranks"):
        shutil.rmtree(os.path.join(out, folder), ignore_errors=True)


def _evaluate(args) -> int:
    from .evaluate import evaluate_synthetic, format_table
    from .results import atomic_write_json, load_synthetic
    from .sources import TensorSource, open_source

    ca.check_evaluate(args)
    images, labels = load_synthetic(args.synthetic)
    train = open_source(args.dataset, "train", path=args.data_path, size=args.size)
    test = open_source(args.dataset, "test", path=args.data_path, size=args.size, like=train)
    if isinstance(test, TensorSource):  # in memory anyway: its own order, as before (same clusters)
        test = test.dataset()
    ca.check_synthetic(args, images, labels, test)
    teacher = _soft_label_teacher(args, train, test) if args.soft_labels else None
    res = evaluate_synthetic(images, labels, test, args.archs, seeds=args.seeds, epochs=args.epochs,
                             recipe=args.recipe, lr=args.lr, batch_size=args.batch_size, soft_labels=teacher,
                             temperature=args.temperature, cutmix_alpha=args.cutmix)
    print(format_table({os.path.basename(os.path.dirname(os.path.abspath(args.synthetic))) or "synthetic": res}))
    if args.json:
        atomic_write_json(res, args.json)
    return 0


def _soft_label_teacher(args, train, test):
    """--soft-labels' network, checked against the test split's images and classes (exit 2 if
    not); a zoo name alone is trained on ``train`` (a source) and cached beside --synthetic."""
    from .evaluate import load_teacher

    arch = args.soft_labels.partition("=")[0].replace(":", "_")
    cache = os.path.join(os.path.dirname(os.path.abspath(args.synthetic)), "models", f"soft_labels_{arch}.pt")
    try:
        return load_teacher(args.soft_labels, test, flag="--soft-labels", cache=cache, train=train,
                            data_key=train.key)
    except ValueError as err:  # names the flag: say it as argparse does
        raise ca.flag_error("--soft-labels", str(err).partition(": ")[2]) from None


def _export(args) -> int:
    from .export import export_imagefolder, export_tensors
    from .results import load_synthetic
    from .sources import open_source

    ca.check_export(args)
    images, labels = load_synthetic(args.synthetic)
    if args.format == "tensors":
        export_tensors(images, labels, args.out)
        print(f"wrote {args.out} ({len(labels)} images)")
        return 0
    train = open_source(args.dataset, "train", path=args.data_path, size=args.size)  # its statistics
    ca.check_synthetic(args, images, labels, train)
    export_imagefolder(images, labels, args.out, train.mean, train.std)
    print(f"wrote {len(labels)} PNGs to {args.out}")
    return 0


_COMPARISON_FLAGS = ("seeds", "iterations", "ipc", "eval_seeds", "eval_epochs", "eval_augment", "eval_archs",
                     "metadd_fraction", "robust_alpha", "robust_groups", "variants", "limit_per_class",
                     "pretrain_target", "pretrain_max_epochs")  # flags named as StudyConfig's fields


def _comparison(args) -> int:
    """``demo`` / ``study``: the config from the preset and the flags given (a bad value: one line naming the flag)."""
    from .demo import run_demo
    from .study import StudyConfig, demo_config, run_study

    ca.check_out("--out", args.out)
    kw = {field: getattr(args, field) for field in _COMPARISON_FLAGS if getattr(args, field) is not None}
    for field in ("eval_archs", "variants"):
        if field in kw:
            kw[field] = tuple(x.strip() for x in kw[field].split(","))
    if kw.get("eval_augment", "").lower() == "none":
        kw["eval_augment"] = None
    try:
        cfg = demo_config(**kw) if args.command == "demo" else StudyConfig(**kw)
    except ValueError as err:  # the config names its fields: say them as flags
        field, _, rest = str(err).partition(": ")
        flag = f"--{field.replace('_', '-')}" if field in _COMPARISON_FLAGS else f"--{args.command}"
        raise InputError(f"{flag}: {rest}") from err
    if args.command == "demo":
        run_demo(args.out, cfg)
    else:
        run_study(args.out, cfg)
    print(f"results: {os.path.join(args.out, 'results.md')}")
    return 0


def _print_info(args) -> int:
    print(json.dumps(_info(), indent=1))
    return 0


COMMANDS = {"distill": _distill, "evaluate": _evaluate, "export": _export, "bench": _bench, "demo": _comparison,
            "study": _comparison, "info": _print_info}


def build_parser() -> ca.OneLineParser:
    parser = ca.OneLineParser(prog="metadd-fast", description="Fused kernels and tools for dataset "
                              "distillation: MetaDD (cross-architecture CAM variance) and robust DD (CVaR).")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_distill(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _add_bench(sub)
    _add_comparison(sub, "demo")
    _add_comparison(sub, "study")
    sub.add_parser("info", help="versions, backends built, devices: what a bug report needs")
    return parser


@contextlib.contextmanager
def _one_line_warnings(command: str):
    """Warnings (a resume under other settings, a backend fallback) as one line
    ``metadd-fast <command>: warning: ...`` on stderr, without the source line."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"metadd-fast {command}: warning: {message}", file=file or sys.stderr)

    previous, warnings.showwarning = warnings.showwarning, show
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv=None) -> int:
    """Parse and check every argument, then run the command. A bad argument or input file ends
    in one line and status 2, a failed write (disk full, permission) in one line and status 1;
    any other error is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        with _one_line_warnings(args.command):
            return COMMANDS[args.command](args)
    except InputError as err:
        print(f"metadd-fast {args.command}: {err}", file=sys.stderr)
        return 2
    except SaveError as err:
        print(f"metadd-fast {args.command}: {err.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
