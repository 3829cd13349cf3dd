"""Large-IPC engine: class chunks, class sharding over gloo ranks, kill -9 and resume, bounded memory."""
import os
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


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run_chunked(EngineConfig(**CFG), _source(), out, progress=False)
    finally:
        dist.destroy_process_group()



def test_two_gloo_ranks_give_the_one_process_result(tmp_path):
    torch.set_num_threads(1)
    try:
        single = run_chunked(EngineConfig(**CFG), _source(), str(tmp_path / "one"), progress=False)
    finally:
        torch.set_num_threads(2)
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
