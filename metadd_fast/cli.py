"""The ``metadd-fast`` command line: distill, evaluate, bench, demo, info."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys

from . import cli_args as ca
from .errors import InputError, SaveError

__all__ = ["main"]


def _add_distill(sub):
    p = sub.add_parser("distill", help="distill a dataset into a small synthetic set (resumable)",
                       description="Distill a dataset. The output folder holds config.json, checkpoints "
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
                        "zoo networks trained on the real data); with --classes-per-chunk each may be "
                        "[torchvision:|timm:]ARCH=PATH, a state_dict file (read with weights_only=True)")
    p.add_argument("--metadd-alpha", type=ca.alpha_or_none, default=None,
                   help="CVaR tail in (0, 1] of the MetaDD term over synthetic images (none: mean)")
    p.add_argument("--metadd-precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="precision of the MetaDD networks: fp32, or bf16/fp16 under torch.autocast (the CAM "
                        "math stays float32; docs/precision.md); large-IPC engine only")
    p.add_argument("--robust-alpha", type=ca.alpha_or_none, default=None,
                   help="robust DD: CVaR tail in (0, 1] over groups of real images (nearest synthetic image of "
                        "the class)")
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
                   help="large-IPC engine, sre2l: the teacher, [torchvision:|timm:]ARCH=PATH (a state_dict "
                        "file) or a zoo ARCH trained on the real data (default ConvNetBN)")
    p.add_argument("--device", default=None,
                   help="large-IPC engine: device of the chunk being optimized (default: cpu; under torchrun "
                        "on GPUs, cuda:<local rank>)")
    p.add_argument("--pin-memory", action="store_true",
                   help="large-IPC engine: keep each chunk's real images in pinned host memory (CUDA)")


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="train fresh zoo networks on a synthetic set and test them",
                       description="Cross-architecture evaluation: for each architecture and seed, train a "
                                   "fresh network on the synthetic set (SGD, momentum 0.9, wd 5e-4, lr/10 at "
                                   "half), test on the real test split; mean +- std, and worst-group accuracy "
                                   "over k-means clusters of the test set.")
    p.add_argument("--synthetic", required=True, help="a synthetic.pt in DC's format")
    _add_data_flags(p)
    p.add_argument("--archs", type=ca.model_names, default="ConvNet,ConvNetD2,AlexNet,LeNet",
                   help="comma-separated zoo networks")
    p.add_argument("--seeds", type=ca.positive_int, default=3)
    p.add_argument("--epochs", type=ca.positive_int, default=300)
    p.add_argument("--json", default=None, help="also write the results here")


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


def _add_demo(sub):
    p = sub.add_parser("demo", help="what MetaDD and Robust DD do: digits 32x32 with an inverted minority, DM",
                       description="Distills digits at 32x32, 10% of each class inverted, with DM: base, +MetaDD, "
                                   "+Robust DD, +both; evaluates on held-out networks (accuracy, inverted-digit "
                                   "accuracy, k-means worst group), measures CAM variance before and after, and "
                                   "writes results.md, results.json and PNGs to --out.")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--iterations", type=ca.positive_int, default=30, help="DM updates per variant and seed")
    p.add_argument("--seeds", type=ca.positive_int, default=3, help="distillation seeds per variant")
    p.add_argument("--eval-seeds", type=ca.positive_int, default=1,
                   help="evaluation seeds per synthetic set and network")
    p.add_argument("--eval-epochs", type=ca.positive_int, default=30,
                   help="evaluation training epochs (batch 16, no augmentation)")
    p.add_argument("--metadd-fraction", type=ca.positive_float, default=0.5,
                   help="MetaDD weight: its gradient on the initial images as a fraction of the method's")
    p.add_argument("--robust-alpha", type=ca.alpha_or_none, default=0.3, help="Robust DD's CVaR tail fraction")
    p.add_argument("--variants", default="base,+MetaDD,+Robust DD,+both", help="comma-separated variants")


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
    """The engine's ValueError ("field: message", naming EngineConfig fields) as the CLI's
    one-line error naming flags; any other ValueError is a bug and is raised as it is."""
    from .engine import EngineConfig

    fields = EngineConfig.__dataclass_fields__
    field, sep, rest = str(err).partition(": ")
    if not sep or field not in fields:
        raise err
    rest = re.sub(r"\b([a-z]+(?:_[a-z]+)+)\b", lambda m: f"--{m[1].replace('_', '-')}" if m[1] in fields else m[1],
                  rest)
    return InputError(f"--{field.replace('_', '-')}: {rest}")


def _distill_chunked(args, train) -> int:
    import torch
    import torch.distributed as dist

    from .engine import DatasetSource, EngineConfig, run_chunked

    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    teacher = args.teacher if args.teacher is not None or args.method != "sre2l" else "ConvNetBN"
    cfg = EngineConfig(method=args.method, ipc=args.ipc, iterations=args.iterations,
                       classes_per_chunk=args.classes_per_chunk, batch_real=args.batch_real, arch=args.arch,
                       lr=args.lr, seed=args.seed, robust_alpha=args.robust_alpha, robust_weight=args.robust_weight,
                       cvar_chunks=args.cvar_chunks, metadd_weight=args.metadd_weight,
                       metadd_alpha=args.metadd_alpha, metadd_precision=args.metadd_precision, teacher=teacher,
                       metadd_models=tuple(args.metadd_models) if args.metadd_weight else (),
                       device=device, pin_memory=args.pin_memory)
    try:
        world = dist.get_world_size() if dist.is_initialized() else 1
        try:
            cfg.check(world)
            run = run_chunked(cfg, DatasetSource(train), args.out)
        except ValueError as err:  # the engine names its config fields: say them as flags
            raise _as_flag_error(err) from err
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if run is not None:
        print(f"wrote {os.path.join(args.out, 'synthetic.pt')} ({run['seconds']:.0f} s)")
    return 0


RUN_FILES = ("config.json", "state.pt", "synthetic.pt", "run.json", "synthetic.f32", "groups.pt")


def _discard_run(out: str) -> None:
    """--restart: remove a previous run's files from ``out`` (and nothing else)."""
    import shutil

    for f in RUN_FILES:
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    shutil.rmtree(os.path.join(out, "chunks"), ignore_errors=True)


def _distill(args) -> int:
    from . import pipeline
    from .data import load

    ca.check_distill(args)
    args.metadd_models = args.metadd_models or pipeline.DistillConfig.metadd_models
    train = load(args.dataset, "train", path=args.data_path, size=args.size)
    ca.check_train_data(args, train)
    if args.restart:
        _discard_run(args.out)
    if args.classes_per_chunk:
        return _distill_chunked(args, train)
    cfg = pipeline.DistillConfig(
        dataset=args.dataset, data_path=args.data_path, size=args.size, method=args.method, ipc=args.ipc,
        iterations=args.iterations, lr=args.lr, batch_real=args.batch_real, arch=args.arch,
        metadd_weight=args.metadd_weight, metadd_models=tuple(args.metadd_models),
        metadd_alpha=args.metadd_alpha, robust_alpha=args.robust_alpha, robust_weight=args.robust_weight,
        zca=args.zca, seed=args.seed, checkpoint_every=args.checkpoint_every)
    run = pipeline.run_distill(cfg, args.out, train=train)
    print(f"wrote {os.path.join(args.out, 'synthetic.pt')} ({run['seconds']:.0f} s)")
    return 0


def _evaluate(args) -> int:
    from .data import load
    from .evaluate import evaluate_synthetic, format_table
    from .results import atomic_write_json, load_synthetic

    ca.check_evaluate(args)
    images, labels = load_synthetic(args.synthetic)
    test = load(args.dataset, "test", path=args.data_path, size=args.size)
    ca.check_synthetic(args, images, labels, test)
    res = evaluate_synthetic(images, labels, test, args.archs, seeds=args.seeds, epochs=args.epochs)
    print(format_table({os.path.basename(os.path.dirname(os.path.abspath(args.synthetic))) or "synthetic": res}))
    if args.json:
        atomic_write_json(res, args.json)
    return 0


def _demo(args) -> int:
    from .demo import DemoConfig, run_demo

    ca.check_out("--out", args.out)
    try:
        cfg = DemoConfig(iterations=args.iterations, distill_seeds=args.seeds, eval_seeds=args.eval_seeds,
                         eval_epochs=args.eval_epochs, metadd_fraction=args.metadd_fraction,
                         robust_alpha=args.robust_alpha, variants=tuple(args.variants.split(",")))
    except ValueError as err:  # DemoConfig names its fields: say them as flags
        field, _, rest = str(err).partition(": ")
        flag = {"distill_seeds": "--seeds"}.get(field, f"--{field.replace('_', '-')}")
        raise InputError(f"{flag}: {rest}") from err
    run_demo(args.out, cfg)
    return 0


def _print_info(args) -> int:
    print(json.dumps(_info(), indent=1))
    return 0


COMMANDS = {"distill": _distill, "evaluate": _evaluate, "bench": _bench, "demo": _demo, "info": _print_info}


def build_parser() -> ca.OneLineParser:
    parser = ca.OneLineParser(prog="metadd-fast", description="Fused kernels and tools for dataset "
                              "distillation: MetaDD (cross-architecture CAM variance) and robust DD (CVaR).")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_distill(sub)
    _add_evaluate(sub)
    _add_bench(sub)
    _add_demo(sub)
    sub.add_parser("info", help="versions, backends built, devices: what a bug report needs")
    return parser


def main(argv=None) -> int:
    """Parse and check every argument, then run the command. A bad argument or input file ends
    in one line and status 2, a failed write (disk full, permission) in one line and status 1;
    any other error is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except InputError as err:
        print(f"metadd-fast {args.command}: {err}", file=sys.stderr)
        return 2
    except SaveError as err:
        print(f"metadd-fast {args.command}: {err.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
