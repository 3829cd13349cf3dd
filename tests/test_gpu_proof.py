"""The GPU proof cannot rot: its dry run (benchmarks/gpu_proof.py --dry-run, the same parts on the
CPU at tiny shapes) runs in a subprocess and writes a summary that says what ran, what passed and
what stopped at its budget."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_proof_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_proof.sh"), "--out", str(tmp_path), "--dry-run"],
                          cwd=ROOT, env=dict(env, PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    parts = summary["parts"]
    assert list(parts) == ["install", "tests", "bench_ops", "bench_metadd", "plots"]
    assert parts["install"]["status"] == "skipped (dry run)"
    counts = parts["tests"].get("counts", {})
    assert counts.get("failed") == 0 and counts.get("error") == 0
    assert parts["tests"]["status"] == "passed" and counts["passed"] >= 15, parts["tests"]
    for name in ("bench_ops", "bench_metadd", "plots"):  # on a loaded CPU a part may reach its budget
        assert parts[name]["status"] == "passed" or parts[name]["status"].startswith("stopped at its budget"), name
    assert summary["dry_run"] and summary["versions"]["torch"]
    log = (tmp_path / "log.txt").read_text()
    assert re.findall(r"^##### (\w+): ", log, re.M) == ["tests", "bench_ops", "bench_metadd", "plots"]
