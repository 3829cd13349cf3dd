"""Timing and memory measurement helpers for the benchmark runners.

CPU: wall-clock over repeated calls after warm-up (median, 20th and 80th
percentiles); peak memory as the peak RSS, sampled every 0.2 ms in a child
process, above the RSS before the first timed call. CUDA: triton.testing.do_bench
with CUDA events, and torch.cuda.max_memory_allocated above the inputs.
"""
from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import threading
import time

import torch


def percentiles(samples):
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(round(q * (len(s) - 1))))]  # noqa: E731
    return pick(0.5), pick(0.2), pick(0.8)


def time_cpu(fns: dict, warmup: int = 3, reps: int = 40, budget_s: float = 20.0) -> dict:
    """{name: (p50, p20, p80) seconds} of each fn() on the CPU, timed round-robin so
    that every provider sees the same background load. Fewer rounds (at least
    min(5, reps)) when the round-robin would take longer than ``budget_s``."""
    per_round = 0.0
    for fn in fns.values():
        for i in range(max(1, warmup)):
            t0 = time.perf_counter()
            fn()
            if i == max(1, warmup) - 1:
                per_round += time.perf_counter() - t0
    reps = max(min(5, reps), min(reps, int(budget_s / max(per_round, 1e-9))))
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: percentiles(v) for name, v in samples.items()}


def time_cuda(fns: dict) -> dict:
    """{name: (p50, p20, p80) seconds} of each fn() on the GPU, CUDA events via triton.testing.do_bench."""
    import triton.testing

    out = {}
    for name, fn in fns.items():
        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        out[name] = (p50 / 1e3, p20 / 1e3, p80 / 1e3)
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc), so the next baseline is live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_rss(fn, calls: int = 5) -> int:
    """Peak RSS above the RSS before the calls, sampled in a thread while fn() runs."""
    fn()  # warm-up: compilation, allocator and thread-pool start-up stay out
    gc.collect()
    _trim_heap()
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    for _ in range(calls):
        fn()
    done.set()
    t.join()
    return peak[0] - base


def peak_extra_cuda(fn) -> int:
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "cpu"
    return f"{model} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
