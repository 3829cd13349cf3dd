"""Run of record: hard vs soft labels for DM, DC and SRe2L synthetic sets of digits at the same IPC.

Distills digits 16x16 at IPC 1 with each method (``metadd-fast distill``, few iterations:
a CPU-sized run), trains one teacher (zoo ConvNet, 15 epochs on the real training split,
cached), then evaluates every set on ConvNet students with the ``default`` recipe
(SGD, DSA) at ``--epochs``, with hard labels and with the teacher's soft labels (T = 4),
over ``--seeds`` seeds. Writes ``soft_labels_digits.json`` and ``.md`` (mean +- std over
seeds, per-seed values, CPU model, seconds) to ``--out``.

    python benchmarks/soft_labels_record.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metadd_fast.cli import main as cli_main  # noqa: E402
from metadd_fast.data import load_digits  # noqa: E402
from metadd_fast.evaluate import evaluate_synthetic, load_teacher  # noqa: E402
from metadd_fast.results import atomic_write_json, atomic_write_text, load_synthetic  # noqa: E402
from metadd_fast.sources import TensorSource  # noqa: E402
from metadd_fast.training import accuracy  # noqa: E402

ITERATIONS = {"dm": 20, "dc": 5, "sre2l": 20}
ARCHS = ["ConvNet"]


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--runs", default="soft_labels_runs", help="where the synthetic sets and the teacher go")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-real", type=int, default=16, help="distillation's real images per class and step")
    p.add_argument("--temperature", type=float, default=4.0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    train, test = load_digits("train", 16), load_digits("test", 16)
    teacher = load_teacher("ConvNet", test, train=TensorSource(train), cache=os.path.join(args.runs, "teacher.pt"),
                           data_key="digits16")
    rows = {"cpu": cpu_model(), "threads": __import__("torch").get_num_threads(), "ipc": args.ipc,
            "seeds": args.seeds, "epochs": args.epochs, "temperature": args.temperature, "recipe": "default",
            "teacher": "ConvNet", "batch_real": args.batch_real,
            "teacher_acc": accuracy(teacher, test.images, test.labels), "sets": {}}
    for method, iters in ITERATIONS.items():
        out = os.path.join(args.runs, method)
        if not os.path.exists(os.path.join(out, "synthetic.pt")):
            cli_main(["distill", "--method", method, "--ipc", str(args.ipc), "--iterations", str(iters),
                      "--batch-real", str(args.batch_real), "--out", out, "--restart"])
        images, labels = load_synthetic(os.path.join(out, "synthetic.pt"))
        kw = dict(seeds=args.seeds, epochs=args.epochs, recipe="default", progress=False)
        rows["sets"][method] = {
            "iterations": iters,
            "hard": evaluate_synthetic(images, labels, test, ARCHS, **kw),
            "soft": evaluate_synthetic(images, labels, test, ARCHS, soft_labels=teacher,
                                       temperature=args.temperature, **kw)}
    rows["seconds"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    atomic_write_json(rows, os.path.join(args.out, "soft_labels_digits.json"))
    lines = [f"digits 16x16, IPC {args.ipc} (DM, DC, SRe2L: {', '.join(f'{m} {i}' for m, i in ITERATIONS.items())} "
             f"iterations, {args.batch_real} real images per class and step), student ConvNet, recipe default "
             f"({args.epochs} epochs), {args.seeds} seeds; teacher ConvNet ({100 * rows['teacher_acc']:.1f}% test), "
             f"T = {args.temperature}; {rows['cpu']}, {rows['threads']} threads (loaded machine), "
             f"{rows['seconds']:.0f} s", "",
             "| set | hard labels | soft labels | hard, per seed | soft, per seed |", "|---|---|---|---|---|"]
    for method, r in rows["sets"].items():
        h, s_ = r["hard"]["ConvNet"], r["soft"]["ConvNet"]
        cells = [f"{100 * x['mean']:.1f} ± {100 * x['std']:.1f}" for x in (h, s_)]
        seeds = [", ".join(f"{100 * v:.1f}" for v in x["acc"]) for x in (h, s_)]
        lines.append(f"| {method} | {cells[0]} | {cells[1]} | {seeds[0]} | {seeds[1]} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(text, os.path.join(args.out, "soft_labels_digits.md"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
