"""Per-call time of eager fused-op calls on the CPU: the dispatch overhead of the op layer.

Median over many calls in one process (of the quietest block of calls) of cvar at 50k values in 500 groups and of
cam_variance at DC CIFAR-10 IPC 1 (B = 10, the K = 4 mix of workloads_cam.py), forward
alone and forward + backward. At these sizes the kernels take a few microseconds, so the
figures are mostly what the Python layers, the dispatcher and autograd cost per call.

    OMP_NUM_THREADS=1 python benchmarks/overhead.py [--calls 2000]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import metadd_fast as mf
from workloads_cam import make_inputs


def _median_us(fn, calls: int, blocks: int = 10) -> float:
    """The lowest of the medians of ``blocks`` consecutive blocks of calls (the quietest
    stretch: on a shared machine a block can be slowed as a whole)."""
    for _ in range(max(10, calls // 10)):  # warm-up
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    size = max(1, calls // blocks)
    return min(statistics.median(times[i:i + size]) for i in range(0, calls, size)) * 1e6


def cases():
    """name -> (forward, forward + backward) callables."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(50_000, generator=g).requires_grad_()
    groups = torch.randint(0, 500, (50_000,), generator=g)
    features, weights, labels, out_size = make_inputs("dc_cifar10_ipc1")

    def cvar_fwd():
        with torch.no_grad():
            mf.cvar(values, 0.1, groups, 500)

    def cvar_fwd_bwd():
        torch.autograd.grad(mf.cvar(values, 0.1, groups, 500), values)

    def cam_fwd():
        with torch.no_grad():
            mf.cam_variance(features, weights, labels, out_size=out_size)

    def cam_fwd_bwd():
        torch.autograd.grad(mf.cam_variance(features, weights, labels, out_size=out_size), features)

    return {"cvar 50k/500 groups": (cvar_fwd, cvar_fwd_bwd), "cam_variance DC IPC 1": (cam_fwd, cam_fwd_bwd)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per case (median reported)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, lowest median of 10 blocks of "
          f"{args.calls // 10} calls")
    print(f"{'case':<24}{'forward us':>12}{'fwd+bwd us':>12}")
    for name, (fwd, fwd_bwd) in cases().items():
        print(f"{name:<24}{_median_us(fwd, args.calls):>12.1f}{_median_us(fwd_bwd, args.calls):>12.1f}")


if __name__ == "__main__":
    main()
