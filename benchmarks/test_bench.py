"""pytest-benchmark cases of every op: eager reference, torch.compile(reference), fused.

    pytest benchmarks/ --benchmark-columns=min,median,max

The CSV of record (ratios in one run, peak memory, bandwidth) comes from
benchmarks/run.py; this file gives the same cases to pytest-benchmark.
"""
import pytest
import torch
from providers import MODES, PROVIDERS, timed_call
from run import op_modules

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(op, w, p, m) for op, mod in op_modules().items()
         for w in (mod.WORKLOADS if DEVICE == "cuda" else mod.CPU_WORKLOADS)
         for p in getattr(mod, "PROVIDERS", PROVIDERS) for m in getattr(mod, "MODES", MODES)]
_inputs = {}


def _sync(out):
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("op, workload, provider, mode", CASES)
def test_op(benchmark, op, workload, provider, mode):
    mod = op_modules()[op]
    if workload not in _inputs:
        _inputs[workload] = mod.make_inputs(workload, DEVICE)
    inputs = _inputs[workload]
    benchmark.group = f"{op}-{workload}-{mode}"
    call = timed_call(mod, op, provider, mode, inputs)
    call.prepare()
    call.run()  # warm-up (compilation)
    if call.setup is None:
        benchmark(lambda: _sync(call.run()))
    else:
        benchmark.pedantic(lambda: _sync(call.run()), setup=lambda: _sync(call.setup()), rounds=20)
