"""A rank that dies in a distributed run: the survivors stop in bounded time and name it.

Each rank writes its host and process id to ``<out>/ranks/rank_XXXXX.json`` (the run folder
is shared by the ranks, as the chunk markers are). When a collective fails (a peer's
connection closed, or no answer within the process group's timeout) or the launcher stops
the rank (torchrun sends SIGTERM to the survivors when a rank dies), the rank raises
:class:`RankFailure`, one line naming the ranks on its host that are gone (or, where none
is, the ranks on other hosts to look at). Finished chunks are kept, so the same command
resumes the run.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import threading
import time

import torch.distributed as dist

from .results import atomic_write_json

__all__ = ["RankFailure", "init_from_env", "watch", "dead_ranks"]

# Words of the errors torch.distributed's backends raise as plain RuntimeErrors.
_BACKEND_WORDS = ("gloo", "nccl", "connection closed", "timed out", "monitoredbarrier", "processgroup")


class RankFailure(RuntimeError):
    """A rank of a distributed run died or stopped answering; the message (one line) names it."""


def init_from_env(backend: str, timeout_s: float) -> None:
    """``dist.init_process_group`` from torchrun's environment (``env://``) with a timeout of
    ``timeout_s`` seconds for every collective, and the process group's keys under a prefix
    per restart (``TORCHELASTIC_RESTART_COUNT``): torchrun's c10d rendezvous keeps one store
    across restarts, so a restarted rank could otherwise read a peer's address of the attempt
    before and fail to connect (gloo: "connectFullMesh failed ... Connection refused")."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"metadd_fast/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def _path(out: str, rank: int) -> str:
    return os.path.join(out, "ranks", f"rank_{rank:05d}.json")


def _gone(pid: int) -> bool:
    """Whether process ``pid`` of this host has ended (a zombie not yet reaped has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return False


def dead_ranks(out: str, world: int, me: int) -> tuple:
    """(ranks whose process on this host has ended, ranks on other hosts) among the ranks
    other than ``me`` that registered in ``out``."""
    dead, elsewhere, host = [], [], socket.gethostname()
    for r in range(world):
        if r == me:
            continue
        try:
            with open(_path(out, r)) as f:
                info = json.load(f)
            pid = int(info["pid"])
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if info.get("host") != host:
            elsewhere.append(r)
        elif pid > 0 and _gone(pid):
            dead.append(r)
    return dead, elsewhere


def _failure(out: str, world: int, rank: int, what: str) -> RankFailure:
    dead, elsewhere = dead_ranks(out, world, rank)
    for _ in range(20):  # a rank that just closed its connections may not have ended yet
        if dead:
            break
        time.sleep(0.1)
        dead, elsewhere = dead_ranks(out, world, rank)
    if dead:
        who = f"rank{'s' if len(dead) > 1 else ''} {', '.join(map(str, dead))} died"
    elif elsewhere:
        who = f"no rank of this host ended: see the logs of ranks {', '.join(map(str, elsewhere))} (other hosts)"
    else:
        who = "no rank of this host ended: one hung"
    return RankFailure(f"rank {rank}: {what}: {who}; finished chunks are kept in {out}/chunks: "
                       "the same command resumes the run")


def _is_backend_error(err: BaseException) -> bool:
    return isinstance(err, dist.DistError) or any(w in str(err).lower() for w in _BACKEND_WORDS)


@contextlib.contextmanager
def watch(out: str, group=None):
    """Around a rank's part of a distributed run (a no-op outside one): registers the rank,
    and turns a failed collective, or SIGTERM from the launcher, into :class:`RankFailure`."""
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    atomic_write_json({"host": socket.gethostname(), "pid": os.getpid()}, _path(out, rank))

    def stopped(signum, frame):
        raise _failure(out, world, rank, "stopped by the launcher (SIGTERM)")

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stopped) if main else None
    try:
        yield
    except RankFailure:
        raise
    except RuntimeError as err:
        if not _is_backend_error(err):
            raise
        raise _failure(out, world, rank, f"a collective failed ({str(err).strip().splitlines()[0][:160]})") \
            from err
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
