"""Timing and memory measurement helpers for the benchmark runners.

CPU: wall-clock over repeated calls after warm-up (median, 20th and 80th
percentiles); peak memory as the peak RSS, sampled every 0.2 ms in a child
process, above the RSS before the timed call. CUDA: triton.testing.do_bench
with CUDA events, and torch.cuda.max_memory_allocated above the memory before
the call.

What is timed is a ``Call``: ``run()``, after ``setup()`` where one is given
(the backward mode builds its graph there); setup is neither timed nor counted
in the peak memory.
"""
from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import threading
import time
from typing import Callable, NamedTuple, Optional

import torch


class Call(NamedTuple):
    run: Callable[[], object]
    setup: Optional[Callable[[], None]] = None

    def prepare(self) -> None:
        if self.setup is not None:
            self.setup()


def percentiles(samples):
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(round(q * (len(s) - 1))))]  # noqa: E731
    return pick(0.5), pick(0.2), pick(0.8)


def time_cpu(calls: dict, warmup: int = 3, reps: int = 40, budget_s: float = 20.0) -> dict:
    """{name: (p50, p20, p80) seconds} of each Call on the CPU, timed round-robin so
    that every provider sees the same background load. Fewer rounds (at least
    min(5, reps)) when the round-robin would take longer than ``budget_s``."""
    per_round = 0.0
    for call in calls.values():
        for i in range(max(1, warmup)):
            call.prepare()
            t0 = time.perf_counter()
            call.run()
            if i == max(1, warmup) - 1:
                per_round += time.perf_counter() - t0
    reps = max(min(5, reps), min(reps, int(budget_s / max(per_round, 1e-9))))
    samples = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            call.prepare()
            t0 = time.perf_counter()
            call.run()
            samples[name].append(time.perf_counter() - t0)
    return {name: percentiles(v) for name, v in samples.items()}


def time_cuda(calls: dict, reps: int = 100) -> dict:
    """{name: (p50, p20, p80) seconds} of each Call on the GPU with CUDA events:
    triton.testing.do_bench (L2 flushed before each call), or with a setup, the same
    loop by hand so that the setup stays outside the events."""
    import triton.testing

    out = {}
    for name, call in calls.items():
        if call.setup is None:
            p50, p20, p80 = triton.testing.do_bench(call.run, quantiles=[0.5, 0.2, 0.8])
            out[name] = (p50 / 1e3, p20 / 1e3, p80 / 1e3)
            continue
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # larger than L2
        times = []
        for i in range(reps + 5):
            call.prepare()
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call.run()
            end.record()
            torch.cuda.synchronize()
            if i >= 5:  # warm-up
                times.append(start.elapsed_time(end) / 1e3)
        out[name] = percentiles(times)
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


def peak_extra_rss(call: Call, calls: int = 5) -> int:
    """Largest peak RSS, over ``calls`` runs, above the RSS just before the run (after its
    setup), sampled in a thread every 0.2 ms."""
    call.prepare()
    call.run()  # warm-up: compilation, allocator and thread-pool start-up stay out
    extra = 0
    for _ in range(calls):
        call.prepare()
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
        call.run()
        done.set()
        t.join()
        extra = max(extra, peak[0] - base)
    return extra


def peak_extra_cuda(call: Call) -> int:
    """Peak allocated CUDA memory during run() above the memory allocated before it."""
    call.prepare()
    call.run()
    call.prepare()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call.run()
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
    from metadd_fast.precision import cpu_flags

    bf16 = "+".join(f for f in ("avx512_bf16", "amx_bf16") if f in cpu_flags()) or "no bf16"
    return f"{model} ({torch.get_num_threads()} threads, {bf16})"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
