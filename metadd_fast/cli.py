"""The ``metadd-fast`` command line: distill, evaluate, bench, demo, info."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

__all__ = ["main"]


def _floats_or_none(text: str):
    return None if text.lower() in ("none", "") else float(text)


def _add_distill(sub):
    p = sub.add_parser("distill", help="distill a dataset into a small synthetic set (resumable)",
                       description="Distill a dataset. The output folder holds config.json, checkpoints "
                                   "(state.pt, every --checkpoint-every steps) and, at the end, synthetic.pt "
                                   "(DC's format) and PNGs. Re-running the same command continues an "
                                   "interrupted run; --restart discards it.")
    p.add_argument("--dataset", default="digits", help="digits (embedded), cifar10, cifar100 or folder")
    p.add_argument("--data-path", default=None, help="local path of cifar batches or an image folder root")
    p.add_argument("--size", type=int, default=16, help="image size for digits (16 or 32) or folders")
    p.add_argument("--method", default="dm", choices=["dm", "dc", "sre2l"], help="distillation method")
    p.add_argument("--ipc", type=int, default=10, help="synthetic images per class")
    p.add_argument("--iterations", type=int, default=200, help="synthetic-image updates")
    p.add_argument("--lr", type=float, default=None, help="image learning rate (default: the method's)")
    p.add_argument("--batch-real", type=int, default=128, help="real images per class per step")
    p.add_argument("--arch", default="ConvNet", help="network the method matches through")
    p.add_argument("--metadd-weight", type=float, default=0.0, help="weight of the MetaDD term (0: off)")
    p.add_argument("--metadd-models", default="ConvNet,ConvNetD1,AlexNet,LeNet",
                   help="comma-separated zoo networks, trained on the real data, for MetaDD")
    p.add_argument("--metadd-alpha", type=_floats_or_none, default=None,
                   help="CVaR tail of the MetaDD term over synthetic images (none: mean)")
    p.add_argument("--robust-alpha", type=_floats_or_none, default=None,
                   help="robust DD: CVaR tail over groups of real images (nearest synthetic image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints")
    p.add_argument("--out", required=True, help="output folder (resumed if it holds this run)")
    p.add_argument("--restart", action="store_true", help="discard a previous run in --out")
    p.add_argument("--resume", action="store_true", help="require a previous run in --out to continue")
    p.add_argument("--classes-per-chunk", type=int, default=None,
                   help="large-IPC engine (dm): optimize this many classes at a time into a memory-mapped "
                        "synthetic set, one checkpoint per chunk; under torchrun the chunks are sharded "
                        "across ranks (gloo on CPU, NCCL on GPU) and rank 0 writes the result")
    p.add_argument("--cvar-chunks", type=int, default=1,
                   help="large-IPC engine with --robust-alpha: chunks optimized together under one CVaR over "
                        "all their groups (split across ranks; a multiple of the world size)")
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
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-path", default=None)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--archs", default="ConvNet,ConvNetD2,AlexNet,LeNet", help="comma-separated zoo networks")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--json", default=None, help="also write the results here")


def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmark every op: eager vs torch.compile vs fused",
                       description="Runs benchmarks/run.py of a source checkout: timings, peak memory and "
                                   "bandwidth, appended to benchmarks/results/results.csv.")
    p.add_argument("--quick", action="store_true", help="the small workloads only (a few minutes on a CPU)")
    p.add_argument("--ops", nargs="+", default=None, help="ops to run (default: all)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def _add_demo(sub):
    p = sub.add_parser("demo", help="what MetaDD and Robust DD do: digits 32x32 with an inverted minority, DM",
                       description="Distills digits at 32x32, 10% of each class inverted, with DM: base, +MetaDD, "
                                   "+Robust DD, +both; evaluates on held-out networks (accuracy, inverted-digit "
                                   "accuracy, k-means worst group), measures CAM variance before and after, and "
                                   "writes results.md, results.json and PNGs to --out.")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--iterations", type=int, default=30, help="DM updates per variant and seed")
    p.add_argument("--seeds", type=int, default=3, help="distillation seeds per variant")
    p.add_argument("--eval-seeds", type=int, default=1, help="evaluation seeds per synthetic set and network")
    p.add_argument("--eval-epochs", type=int, default=30, help="evaluation training epochs (batch 16, no augmentation)")
    p.add_argument("--metadd-fraction", type=float, default=0.5,
                   help="MetaDD weight: its gradient on the initial images as a fraction of the method's")
    p.add_argument("--robust-alpha", type=float, default=0.3, help="Robust DD's CVaR tail fraction")
    p.add_argument("--variants", default="base,+MetaDD,+Robust DD,+both", help="comma-separated variants")


def _info() -> dict:
    import torch

    from . import __version__, backends

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
        info[f"backend_{name}"] = "available" if backends.available(name) else f"missing: {backends._load(name)}"
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


def _distill_chunked(args) -> int:
    import torch
    import torch.distributed as dist

    from .data import load
    from .engine import DatasetSource, EngineConfig, run_chunked

    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    cfg = EngineConfig(method=args.method, ipc=args.ipc, iterations=args.iterations,
                       classes_per_chunk=args.classes_per_chunk, batch_real=args.batch_real, arch=args.arch,
                       lr=args.lr, seed=args.seed, robust_alpha=args.robust_alpha, cvar_chunks=args.cvar_chunks,
                       device=device, pin_memory=args.pin_memory)
    try:
        run = run_chunked(cfg, DatasetSource(load(args.dataset, "train", path=args.data_path, size=args.size)),
                          args.out)
    except ValueError as err:
        print(f"metadd-fast distill: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if run is not None:
        print(f"wrote {os.path.join(args.out, 'synthetic.pt')} ({run['seconds']:.0f} s)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="metadd-fast", description="Fused kernels and tools for dataset "
                                     "distillation: MetaDD (cross-architecture CAM variance) and robust DD (CVaR).")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_distill(sub)
    _add_evaluate(sub)
    _add_bench(sub)
    _add_demo(sub)
    sub.add_parser("info", help="versions, backends built, devices: what a bug report needs")
    args = parser.parse_args(argv)

    if args.command == "info":
        print(json.dumps(_info(), indent=1))
        return 0
    if args.command == "bench":
        return _bench(args)
    from . import pipeline

    if args.command == "demo":
        from .demo import DemoConfig, run_demo

        try:
            cfg = DemoConfig(iterations=args.iterations, distill_seeds=args.seeds, eval_seeds=args.eval_seeds,
                             eval_epochs=args.eval_epochs, metadd_fraction=args.metadd_fraction,
                             robust_alpha=args.robust_alpha, variants=tuple(args.variants.split(",")))
        except ValueError as err:
            print(f"metadd-fast demo: {err}", file=sys.stderr)
            return 2
        run_demo(args.out, cfg)
        return 0
    if args.command == "distill":
        if args.restart and os.path.isdir(args.out):
            import shutil

            for f in ("config.json", "state.pt", "synthetic.pt", "run.json", "synthetic.f32"):
                if os.path.exists(os.path.join(args.out, f)):
                    os.remove(os.path.join(args.out, f))
            shutil.rmtree(os.path.join(args.out, "chunks"), ignore_errors=True)
        if args.resume and not os.path.exists(os.path.join(args.out, "config.json")) and \
                not os.path.exists(os.path.join(args.out, "run.json")):
            print(f"metadd-fast distill: --resume: {args.out} holds no run to continue", file=sys.stderr)
            return 2
        if args.classes_per_chunk:
            return _distill_chunked(args)
        cfg = pipeline.DistillConfig(
            dataset=args.dataset, data_path=args.data_path, size=args.size, method=args.method, ipc=args.ipc,
            iterations=args.iterations, lr=args.lr, batch_real=args.batch_real, arch=args.arch,
            metadd_weight=args.metadd_weight, metadd_models=tuple(args.metadd_models.split(",")),
            metadd_alpha=args.metadd_alpha, robust_alpha=args.robust_alpha, seed=args.seed,
            checkpoint_every=args.checkpoint_every)
        try:
            run = pipeline.run_distill(cfg, args.out)
        except ValueError as err:
            print(f"metadd-fast distill: {err}", file=sys.stderr)
            return 2
        print(f"wrote {os.path.join(args.out, 'synthetic.pt')} ({run['seconds']:.0f} s)")
        return 0
    # evaluate
    from .data import load
    from .evaluate import evaluate_synthetic, format_table
    from .results import load_synthetic

    try:
        images, labels = load_synthetic(args.synthetic)
        test = load(args.dataset, "test", path=args.data_path, size=args.size)
    except ValueError as err:
        print(f"metadd-fast evaluate: {err}", file=sys.stderr)
        return 2
    res = evaluate_synthetic(images, labels, test, args.archs.split(","), seeds=args.seeds, epochs=args.epochs)
    print(format_table({os.path.basename(os.path.dirname(os.path.abspath(args.synthetic))) or "synthetic": res}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
