"""Shared helpers of the command-line safety tests: run the CLI in a subprocess, check that an
error is one line, and craft files that would run code if they were unpickled."""
from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*argv, script: str = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m metadd_fast.cli ARGV`` (or ``python -c SCRIPT ARGV``, for a patched run)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    head = ["-c", script] if script else ["-m", "metadd_fast.cli"]
    return subprocess.run([sys.executable, *head, *map(str, argv)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def one_line(stderr: str, *fragments: str) -> str:
    """The single line of ``stderr`` (tqdm bars aside), which must hold every fragment."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and not re.search(r"\d%\|", ln)]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def run_main(argv, capsys) -> tuple:
    """metadd_fast.cli.main(argv) in this process: (exit status, stderr)."""
    from metadd_fast.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


class Payload:
    """Unpickling this creates the file ``marker``: code run by a load."""

    def __init__(self, marker: str):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def payload_runs(tmp_path, protocol: int = 2) -> None:
    """The payload does run code when unpickled without restriction (so the tests can fail)."""
    marker = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(Payload(marker), protocol=protocol)).close()
    assert marker.exists()
    marker.unlink()


def write_cifar(folder, batches: dict = None, per_class: int = 2) -> None:
    """A tiny CIFAR-10 python-version folder: 5 train batches and a test batch of
    ``per_class`` images of each class, with ``batches`` overriding named batches."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = 10 * per_class
        batch = (batches or {}).get(name, {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                           b"labels": [i % 10 for i in range(n)], b"batch_label": b"x"})
        (folder / name).write_bytes(batch if isinstance(batch, bytes) else pickle.dumps(batch, protocol=2))
