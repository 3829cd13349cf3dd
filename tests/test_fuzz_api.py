"""Fuzz test of the public API (docs/api_checks.md): every generated case of
tests/fuzz_api_cases.py runs in a worker process, so a crash or a hang is caught and
counted, not fatal. Each case ends in one of:

- ok: a valid call ran, or an invalid one raised TypeError/ValueError naming its argument;
- crash: another exception, or the worker died (segfault, abort, out of memory);
- hang: no answer within CASE_TIMEOUT seconds (the worker is killed);
- silent: an invalid input accepted;
- refused: a valid input refused;
- unnamed: an invalid input refused with a message that does not name the argument.

All but "ok" must be 0. ``python tests/test_fuzz_api.py`` prints the counts and every
failing case (how the before/after figures in docs/api_checks.md were taken).
"""
from __future__ import annotations

import collections
import json
import os
import queue
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import fuzz_api_cases  # noqa: E402

WORKERS = 2
CASE_TIMEOUT = float(os.environ.get("FUZZ_API_CASE_TIMEOUT", 30))  # seconds for one case (the slowest: ~1 s)
START_TIMEOUT = 120.0  # seconds for a worker to import torch and the library
KINDS = ("ok", "crash", "hang", "silent", "refused", "unnamed")


def _classify(case, result: dict) -> str:
    outcome = result["outcome"]
    if outcome in ("crashed", "died"):
        return "crash"
    if outcome == "hang":
        return "hang"
    if case.valid:
        return "ok" if outcome == "accepted" else "refused"
    if outcome == "accepted":
        return "silent"
    message = result["error"].partition(": ")[2]  # without the exception's type name
    return "ok" if any(n in message for n in case.names) else "unnamed"


def _worker(ids: list, results: dict, env: dict) -> None:
    """Run the cases ``ids`` (an arithmetic sequence) in worker processes, restarting after the
    case that killed or hung one."""
    step = ids[1] - ids[0] if len(ids) > 1 else 1
    todo = list(ids)
    while todo:
        cmd = [sys.executable, os.path.join(HERE, "fuzz_api_cases.py"), "--start", str(todo[0]),
               "--stop", str(todo[-1] + 1), "--step", str(step)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
        current, timeout = None, START_TIMEOUT
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                proc.kill()
                results[current if current is not None else todo[0]] = {"outcome": "hang", "error": "timeout"}
                break
            if line is None:  # the worker ended: finished, or died in ``current``
                proc.wait()
                if current is not None:
                    results[current] = {"outcome": "died", "error": f"worker exit status {proc.returncode}"}
                elif todo and todo[0] not in results:
                    results[todo[0]] = {"outcome": "died", "error": f"worker exit status {proc.returncode}"}
                break
            msg = json.loads(line)
            if msg.get("event") == "start":
                current, timeout = msg["id"], CASE_TIMEOUT
            else:
                results[msg["id"]] = msg
                current = None
        proc.stdout.close()
        todo = [i for i in todo if i not in results]


def run_fuzz(workers: int = WORKERS, extra_env: dict = None) -> tuple:
    """(counts {kind: n}, failures [(kind, case id, error)], seconds)."""
    global CASE_TIMEOUT
    extra_env = extra_env or {}
    saved = CASE_TIMEOUT, os.environ.get("FUZZ_API_CANARIES")
    os.environ.update({k: v for k, v in extra_env.items() if k == "FUZZ_API_CANARIES"})
    try:
        CASE_TIMEOUT = float(extra_env.get("FUZZ_API_CASE_TIMEOUT", CASE_TIMEOUT))
        cases = fuzz_api_cases.cases()
        return _run(cases, workers, extra_env)
    finally:
        CASE_TIMEOUT = saved[0]
        if saved[1] is None:
            os.environ.pop("FUZZ_API_CANARIES", None)
        else:
            os.environ["FUZZ_API_CANARIES"] = saved[1]


def _run(cases: list, workers: int, extra_env: dict) -> tuple:
    env = {**os.environ, **extra_env, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(HERE),
                                                                      os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    results: dict = {}
    start = time.perf_counter()
    threads = [threading.Thread(target=_worker, args=(list(range(w, len(cases), workers)), results, env))
               for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = collections.Counter({k: 0 for k in KINDS})
    failures = []
    for i, case in enumerate(cases):
        kind = _classify(case, results[i])
        counts[kind] += 1
        if kind != "ok":
            failures.append((kind, case.id, results[i].get("error", "")))
    return dict(counts), failures, time.perf_counter() - start


@pytest.fixture(scope="module")
def fuzz():
    return run_fuzz()


def _report(failures) -> str:
    return "\n".join(f"{kind}: {cid}: {err}" for kind, cid, err in failures)


def test_fuzz_public_api(fuzz):
    counts, failures, seconds = fuzz
    assert sum(counts.values()) >= 300, counts
    assert not failures, f"{counts} in {seconds:.0f} s\n{_report(failures)}"


def test_harness_counts_each_kind():
    """Known outcomes, one per kind: a raised KeyError and an abort() are crashes, a sleep a hang,
    and the cases after them still run in a fresh worker."""
    counts, failures, _ = run_fuzz(workers=1, extra_env={"FUZZ_API_CANARIES": "1", "FUZZ_API_CASE_TIMEOUT": "3"})
    assert counts == {"ok": 2, "crash": 2, "hang": 1, "silent": 1, "refused": 1, "unnamed": 1}, failures


if __name__ == "__main__":
    counts, failures, seconds = run_fuzz()
    for kind, cid, err in failures:
        print(f"{kind:8s} {cid}: {err}")
    by_entry = collections.Counter((kind, cid.split("[")[0]) for kind, cid, _ in failures)
    print("\nper entry point:", json.dumps({f"{k}:{e}": n for (k, e), n in sorted(by_entry.items())}, indent=0))
    print(f"\n{sum(counts.values())} cases in {seconds:.0f} s: " + ", ".join(f"{k} {counts[k]}" for k in KINDS))
