"""The GPU proof in one command: install, the device test cases, the benchmark suite at the GPU
workloads, and a summary, each part within its time budget.

    bash benchmarks/gpu_proof.sh --out DIR [--dry-run]

Parts (each a subprocess, stopped at its budget; the summary says so):

1. install: ``pip install --no-deps --no-build-isolation -e .`` (builds the C++ extension);
2. tests: tests/test_device.py on the device (every op against its float64 reference, opcheck,
   torch.compile, MetaDDLoss with torchvision ResNet-18/50, MobileNetV2, EfficientNet-B0 and
   DenseNet-121 built with weights=None at 224x224 in fp32/bf16/fp16, the engine on one device);
3. bench_ops: benchmarks/run.py at the GPU workloads of benchmarks/gpu_compile.py (CAM variance
   at B=4096 with C 512 and 2048, CVaR of 10^7 values in 10^5 groups, nearest centroid
   10^6 x 5*10^4 x 512): eager, torch.compile and fused, time, memory, copy-bandwidth fraction;
4. bench_metadd: benchmarks/workloads_metadd.py, the MetaDD term with torchvision networks at
   B=256, 224x224 (floor, keep, stream and the precision providers);
5. plots: benchmarks/plot.py on DIR/results.csv.

DIR receives summary.json (device, versions, pass/fail counts, each part's status and seconds,
each workload's time and ratios), results.csv, the PNG plots and log.txt (every part's output):
at most 8 files, one folder. ``--dry-run`` runs the same parts on the CPU at tiny shapes
(install skipped: it would rebuild the extension of this checkout; torchvision cases skipped
where it does not import), within about 3 minutes; tests/test_gpu_proof.py runs it.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

# part -> (budget on the GPU, budget in the dry run), seconds; the GPU total stays under 8 minutes
BUDGETS = {"install": (90, 0), "tests": (150, 80), "bench_ops": (150, 45), "bench_metadd": (60, 25),
           "plots": (20, 15)}
GPU_WORKLOADS = {"cam_variance": ["imagenet_b4096"], "cvar": ["values_1e7_groups_1e5"],
                 "nearest_centroid": ["imagenet_1m_by_50k_d512"]}
DRY_WORKLOADS = {"cam_variance": ["dc_cifar10_ipc1"], "cvar": ["dc_cifar10_ipc50_groups"]}
METADD_GPU, METADD_DRY = "imagenet_torchvision_b256_224", "smoke_k2_b8_16px"


def run_part(name: str, cmd: list, budget: float, log, env: dict) -> dict:
    """Run ``cmd`` within ``budget`` seconds; its output goes to ``log``. Returns its status."""
    log.write(f"\n##### {name}: {' '.join(cmd)} (budget {budget:.0f} s)\n")
    log.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=budget)
        status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the part and its children (benchmark subprocesses)
        out, _ = proc.communicate()
        status = f"stopped at its budget of {budget:.0f} s"
    log.write(out or "")
    log.flush()
    return {"status": status, "seconds": round(time.perf_counter() - t0, 1), "output": out or ""}


def pytest_counts(output: str) -> dict:
    """{passed, failed, skipped, errors} from pytest's last summary line."""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", output):
        counts[word.rstrip("s") if word.startswith("error") else word] = int(n)
    return counts


def workload_rows(path: str) -> list:
    """Each (op, workload, provider)'s time, ratios and bandwidth fraction from results.csv."""
    if not os.path.exists(path):
        return []
    table: dict = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            if r["op"] == "copy":
                continue
            key = (r["op"], r["workload"], r["provider"], r["mode"])
            table.setdefault(key, {})[r["metric"]] = float(r["p50"]) if r["p50"] else None
    return [dict(op=o, workload=w, provider=p, mode=m, **v) for (o, w, p, m), v in table.items()]


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "torchvision"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as err:  # torchvision built for another torch fails with more than ImportError
            out[mod] = f"not importable ({type(err).__name__})"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for summary.json, results.csv, plots and log.txt")
    ap.add_argument("--dry-run", action="store_true", help="the same parts on the CPU at tiny shapes")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import torch

    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        print("gpu_proof: no CUDA device (use --dry-run on a machine without one)", file=sys.stderr)
        return 2
    budget = {k: v[1] if dry else v[0] for k, v in BUDGETS.items()}
    results = os.path.join(args.out, "results.csv")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]), METADD_DEVICE=device,
               PYTHONUNBUFFERED="1")
    if dry:
        env.update(METADD_PROOF_TINY="1", METADD_BENCH_REPS="1", METADD_COMPILE_BACKEND="aot_eager")
    py = sys.executable
    workloads = DRY_WORKLOADS if dry else GPU_WORKLOADS
    parts = {
        "install": None if dry else [py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."],
        "tests": [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_device.py"],
        "bench_ops": [py, "benchmarks/run.py", "--device", device, "--ops", *workloads,
                      "--workloads", *sum(workloads.values(), []), "--out", results],
        "bench_metadd": [py, "benchmarks/workloads_metadd.py", "--device", device,
                         "--workloads", METADD_DRY if dry else METADD_GPU, "--out", results],
        "plots": [py, "benchmarks/plot.py", results],
    }
    summary = {"device": torch.cuda.get_device_name() if not dry else "cpu (dry run)", "dry_run": dry,
               "versions": versions(), "parts": {}, "notes": []}
    if dry:
        summary["notes"].append("dry run: install skipped (it would rebuild this checkout's extension); tiny "
                                "shapes; benchmark timings are single repetitions on the CPU, not figures")
    if summary["versions"]["torchvision"].startswith("not importable"):
        summary["notes"].append("torchvision does not import here: the torchvision MetaDDLoss cases are skipped "
                                "and the MetaDD benchmark uses zoo networks")
        if not dry:
            parts["bench_metadd"][parts["bench_metadd"].index(METADD_GPU)] = "dc_cifar10_ipc10_k4"
    t0 = time.perf_counter()
    with open(os.path.join(args.out, "log.txt"), "w") as log:
        for name, cmd in parts.items():
            if cmd is None:
                summary["parts"][name] = {"status": "skipped (dry run)", "seconds": 0.0}
                continue
            result = run_part(name, cmd, budget[name], log, env)
            output = result.pop("output")
            if name == "tests":
                result["counts"] = pytest_counts(output)
            summary["parts"][name] = result
            print(f"{name:14} {result['status']} ({result['seconds']} s)", flush=True)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["workloads"] = workload_rows(results)
    from metadd_fast.results import atomic_write_json

    atomic_write_json(summary, os.path.join(args.out, "summary.json"))
    print(f"wrote {os.path.join(args.out, 'summary.json')} ({summary['seconds']} s)")
    failed = [n for n, p in summary["parts"].items() if p["status"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
