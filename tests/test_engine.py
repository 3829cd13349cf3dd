"""Large-IPC engine: class chunks, class sharding over gloo ranks, kill -9 and resume, bounded memory."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from metadd_fast.engine import EngineConfig, RandomImageSource, run_chunked

CFG = dict(ipc=2, iterations=2, classes_per_chunk=2, batch_real=6, arch="ConvNetD1")
SHAPE = (3, 8, 8)


def _source(num_classes=6):
    return RandomImageSource(num_classes, 6, SHAPE, seed=3)


def _worker(rank, world, port, out, cfg=CFG):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run_chunked(EngineConfig(**cfg), _source(), out, progress=False)
    finally:
        dist.destroy_process_group()


def _single(cfg, out):
    torch.set_num_threads(1)
    try:
        return run_chunked(EngineConfig(**cfg), _source(), out, progress=False)
    finally:
        torch.set_num_threads(2)

def test_two_gloo_ranks_give_the_one_process_result(tmp_path):
    single = _single(CFG, str(tmp_path / "one"))
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    images, labels = torch.load(tmp_path / "two" / "synthetic.pt")["data"][0]
    assert torch.equal(images, single["images"]) and torch.equal(labels, single["labels"])
    assert images.shape == (12, *SHAPE) and not torch.equal(images[:2], images[2:4])


SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from metadd_fast import engine
    torch.set_num_threads(1)
    real_step = engine.DISTILLERS["dm"].step
    def slow_step(self):  # slow enough to be killed mid-run
        time.sleep(0.15)
        return real_step(self)
    engine.DISTILLERS["dm"].step = slow_step
    cfg = engine.EngineConfig(ipc=2, iterations=2, classes_per_chunk=2, batch_real=6, arch="ConvNetD1")
    engine.run_chunked(cfg, engine.RandomImageSource(int(sys.argv[2]), 6, (3, 8, 8), seed=3), sys.argv[1],
                       progress=False)
""")


def _run(out, classes=6):
    return [sys.executable, "-c", SCRIPT, out, str(classes)]


def test_kill_9_mid_run_then_resume_gives_the_same_result(tmp_path):
    full = tmp_path / "full"
    subprocess.run(_run(str(full)), check=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_run(str(killed)))
    deadline = time.time() + 120
    while not (killed / "chunks" / "chunk_00000.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "synthetic.pt").exists(), "killed before the end"
    subprocess.run(_run(str(killed)), check=True)
    a = torch.load(full / "synthetic.pt")["data"][0]
    b = torch.load(killed / "synthetic.pt")["data"][0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_corrupt_or_foreign_checkpoints_are_refused(tmp_path):
    cfg = EngineConfig(**CFG)
    run_chunked(cfg, _source(), str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="holds a different run"):
        run_chunked(EngineConfig(**dict(CFG, iterations=3)), _source(), str(tmp_path), progress=False)
    (tmp_path / "chunks" / "chunk_00001.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="chunk_00001.pt: corrupt chunk checkpoint"):
        run_chunked(cfg, _source(), str(tmp_path), progress=False)
    torch.save({"digest": "someone-else"}, tmp_path / "chunks" / "chunk_00001.pt")
    with pytest.raises(ValueError, match="checkpoint of another run"):
        run_chunked(cfg, _source(), str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="method"):
        run_chunked(EngineConfig(**dict(CFG, method="dc")), _source(), str(tmp_path / "x"), progress=False)


MEMORY = textwrap.dedent("""
    import resource, sys, torch
    from metadd_fast import engine
    torch.set_num_threads(1)
    cfg = engine.EngineConfig(ipc=2, iterations=1, classes_per_chunk=4, batch_real=16, arch="ConvNetD1")
    engine.run_chunked(cfg, engine.RandomImageSource(int(sys.argv[2]), 64, (3, 32, 32)), sys.argv[1],
                       progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_memory_does_not_grow_with_the_number_of_classes(tmp_path):
    peak = {}
    for classes in (20, 80):
        out = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path / str(classes)), str(classes)],
                             capture_output=True, text=True, check=True)
        peak[classes] = int(out.stdout.split()[-1])
    assert peak[80] <= 1.10 * peak[20], peak


ROBUST = dict(CFG, robust_alpha=0.5, cvar_chunks=2)


def test_cross_rank_cvar_two_gloo_ranks_give_the_one_process_result(tmp_path):
    """Rounds of two chunks share one CVaR: in one process over both chunks' groups, over two
    ranks through cvar(process_group=). 6 classes = chunks 0, 1 | 2: in the last round rank 1
    has no chunk and takes part with no values."""
    single = _single(ROBUST, str(tmp_path / "one"))
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "two"), ROBUST), nprocs=2, join=True)
    images = torch.load(tmp_path / "two" / "synthetic.pt")["data"][0][0]
    assert torch.isfinite(images).all() and torch.equal(images, single["images"])
    # The coupling is real: each chunk with its own CVaR (what ranks that did not talk would get) differs.
    alone = _single(dict(ROBUST, cvar_chunks=1), str(tmp_path / "alone"))
    assert not torch.equal(alone["images"][:8], single["images"][:8])
    assert torch.equal(alone["images"][8:], single["images"][8:])  # the last round has one chunk either way
    plain = _single(CFG, str(tmp_path / "plain"))
    assert not torch.equal(plain["images"], single["images"])


def test_a_round_with_a_missing_chunk_marker_is_redone_whole(tmp_path):
    first = _single(ROBUST, str(tmp_path))["images"].clone()  # the result is backed by synthetic.f32
    (tmp_path / "chunks" / "chunk_00000.pt").unlink()  # killed between the markers of round 0
    data = tmp_path / "synthetic.f32"
    data.write_bytes(b"\x00" * data.stat().st_size)  # any stale images must be rewritten
    again = _single(ROBUST, str(tmp_path))
    assert torch.equal(again["images"][:8], first[:8]) and first[:8].any()
    assert not again["images"][8:].any(), "round 1 was finished and must not be redone"


@pytest.mark.parametrize("change, world, words", [
    (dict(cvar_chunks=3), 2, "cvar_chunks: the 3 chunks of a round cannot be split evenly over 2 ranks"),
    (dict(cvar_chunks=0), 1, "cvar_chunks: expected a positive int"),
    (dict(robust_alpha=1.5), 1, "alpha"),
    (dict(classes_per_chunk=0), 1, "classes_per_chunk"),
    (dict(pin_memory=True), 1, "pin_memory: pinned host memory serves a CUDA device"),
    (dict(method="dc"), 1, "method"),
])
def test_bad_engine_config_is_refused(change, world, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        EngineConfig(**dict(ROBUST, **change)).check(world)


def test_device_and_pinning_do_not_change_the_run_identity():
    a = EngineConfig(**ROBUST)
    assert a.digest("k") == EngineConfig(**dict(ROBUST, device="cpu")).digest("k")
    assert a.digest("k") != EngineConfig(**dict(ROBUST, robust_alpha=0.4)).digest("k")
