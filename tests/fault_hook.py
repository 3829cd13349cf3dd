"""Test-only entry point for the fault tests (tests/test_faults.py): ``metadd-fast`` (cli.main)
with two hooks read from the environment, so that a rank can die in the middle of a chunk.

- ``FAULT_LOG``: a file to which every rank appends ``<launch>.<restart> <rank> start|saved <chunk>``
  when it starts a chunk and when it writes the chunk's marker.
- ``FAULT_KILL=RANK:CLASS:STEP:FLAG``: rank RANK sends itself SIGKILL after step STEP of the chunk
  whose first class is CLASS, unless the file FLAG exists (it is created first, so only the first
  attempt dies). ``FAULT_HANG`` instead of SIGKILL stops the rank with SIGSTOP (a hung rank).
"""
import os
import signal
import sys

from metadd_fast import cli, engine

RANK = os.environ.get("RANK", "0")
ATTEMPT = f"{os.environ.get('FAULT_LAUNCH', '0')}.{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _log(what: str, chunk: int) -> None:
    with open(os.environ["FAULT_LOG"], "a") as f:
        f.write(f"{ATTEMPT} {RANK} {what} {chunk}\n")


_run_round, _atomic_save = engine._run_round, engine.atomic_save


def run_round(cfg, source, store, chunks, positions, *rest):
    for p in positions:
        _log("start", chunks[p][0] // cfg.classes_per_chunk)
    return _run_round(cfg, source, store, chunks, positions, *rest)


def atomic_save(obj, path):
    _atomic_save(obj, path)
    if os.path.basename(os.path.dirname(path)) == "chunks":
        _log("saved", int(os.path.basename(path)[6:11]))


engine._run_round, engine.atomic_save = run_round, atomic_save

if os.environ.get("FAULT_KILL"):
    rank, first, step, flag = os.environ["FAULT_KILL"].split(":")
    if RANK == rank:
        for cls in engine.DISTILLERS.values():
            def finish_step(self, _real=cls.finish_step):
                out = _real(self)
                if int(self.global_labels.min()) == int(first) and self.iteration == int(step) and \
                        not os.path.exists(flag):
                    open(flag, "w").close()
                    os.kill(os.getpid(), signal.SIGSTOP if os.environ.get("FAULT_HANG") else signal.SIGKILL)
                return out
            cls.finish_step = finish_step

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
