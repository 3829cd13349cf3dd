"""GPU readiness without a GPU: every Triton kernel, launched by the real launchers on meta
tensors at the DC and ImageNet workload shapes, compiles for sm_90 and sm_80 with the ptxas of
the triton wheel (benchmarks/gpu_compile.py). Runs in a subprocess without TRITON_INTERPRET
(conftest sets it). The first run compiles (minutes); later runs find the stamp of the same
kernel sources and return at once (see gpu_compile.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ["_cam_map_fwd_kernel", "_cam_map_bwd_kernel", "_cam_feature_grad_kernel", "_cam_weight_grad_kernel",
           "_map_variance_fwd_kernel", "_map_variance_bwd_kernel", "_group_stats_kernel", "_tail_weights_kernel",
           "_values_grad_kernel", "_dual_fwd_kernel", "_dual_bwd_kernel", "_nearest_centroid_kernel"]


def _run(*args, timeout=3600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_kernel_compiles_for_sm90_and_sm80():
    pytest.importorskip("triton")
    proc = _run("benchmarks/gpu_compile.py")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert "[80, 90]" in summary, summary
    assert all(k in summary for k in KERNELS), summary


def test_a_kernel_that_cannot_compile_fails_the_check(tmp_path):
    """The check can fail: a launch whose kernel does not compile for sm_90 raises."""
    pytest.importorskip("triton")
    script = tmp_path / "broken.py"
    script.write_text(
        "import sys, torch, triton, triton.language as tl\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "import gpu_compile\n"
        "@triton.jit\n"
        "def _broken_kernel(p, N, BLOCK: tl.constexpr):\n"
        "    o = tl.arange(0, BLOCK)\n"
        "    tl.store(p + o, tl.load(p + o) @ tl.load(p + o))\n"  # a 1-D dot: no such op
        "def run():\n"
        "    _broken_kernel[(1,)](torch.empty(16, device='meta'), 16, BLOCK=16)\n"
        "launch = gpu_compile.record_launches(run)[0]\n"
        "try:\n"
        "    gpu_compile.compile_launch(launch, 90)\n"
        "except Exception as err:\n"
        "    print('refused', type(err).__name__)\n")
    proc = _run(str(script), timeout=600)
    assert "refused" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
