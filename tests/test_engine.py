"""Large-IPC engine: class chunks, class sharding over gloo ranks, kill -9 and resume, bounded memory;
SRe2L/DC/DM with MetaDD and robust DD; networks from state_dict files; the ImageNet-form networks."""
import json
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

import metadd_fast as mf
from metadd_fast.adapters import cam_target
from metadd_fast.cli import main
from metadd_fast.data import Dataset
from metadd_fast.distill import DISTILLERS, SRe2L
from metadd_fast.engine import EngineConfig, _load_networks, run_chunked
from metadd_fast.grouping import class_nearest_groups
from metadd_fast.model_sources import load_model, parse_spec
from metadd_fast.models import MobileNetV2, ResNet18ImageNet, get_model
from metadd_fast.sources import RandomSource, TensorSource

CFG = dict(ipc=2, iterations=2, classes_per_chunk=2, batch_real=6, arch="ConvNetD1")
SHAPE = (3, 8, 8)


def _source(num_classes=6):
    return RandomSource(num_classes, 6, SHAPE, seed=3)


def _weights(folder, arch, num_classes=6, shape=SHAPE, seed=0):
    """A state_dict file of a zoo network (random weights): what a user's checkpoint holds."""
    torch.manual_seed(seed)
    path = os.path.join(str(folder), f"{arch}_{num_classes}_{shape[-1]}.pt")
    torch.save(get_model(arch, shape[0], num_classes, shape[1:]).state_dict(), path)
    return path


def _metadd(folder):
    """MetaDD on two networks: one from a state_dict file, one zoo network trained on the real data."""
    return dict(metadd_weight=1.0, metadd_models=(f"ConvNetD1={_weights(folder, 'ConvNetD1')}", "ConvNetD2"),
                pretrain_epochs=1)


def _sre2l(folder):
    """SRe2L (zoo ConvNetBN teacher trained on the real data) + MetaDD + robust DD, two chunks per CVaR,
    a checkpoint every step (each rank its own state file; a killed round resumes mid-way)."""
    return dict(CFG, method="sre2l", teacher="ConvNetBN", robust_alpha=0.5, cvar_chunks=2, checkpoint_every=1,
                **_metadd(folder))


def _dc(folder):
    return dict(CFG, method="dc", robust_alpha=0.5, **_metadd(folder))


def _dm_zca(folder):
    """DM in ZCA space (the ZCA fitted again on resume) with zoo MetaDD networks trained on whitened batches."""
    return dict(CFG, method="dm", zca=True, checkpoint_every=1, metadd_weight=1.0, pretrain_epochs=2,
                metadd_models=("ConvNetD1", "ConvNetD2"))


def _worker(rank, world, port, out, cfg=CFG):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run_chunked(EngineConfig(**cfg), _source(), out, progress=False)
    finally:
        dist.destroy_process_group()


def _reading_worker(rank, world, port, out):
    """A rank of a DM run that records the classes of every chunk it reads."""
    from metadd_fast import engine

    read, real = [], engine._chunk_real
    engine._chunk_real = lambda source, classes, *a: read.append(list(classes)) or real(source, classes, *a)
    _worker(rank, world, port, out)
    with open(os.path.join(out, f"read_{rank}.json"), "w") as f:
        json.dump(read, f)


def test_each_rank_reads_only_its_own_chunks_classes(tmp_path):
    out = str(tmp_path / "two")
    mp.spawn(_reading_worker, args=(2, free_port(), out), nprocs=2, join=True)
    read = [json.load(open(os.path.join(out, f"read_{r}.json"))) for r in (0, 1)]
    assert read == [[[0, 1], [4, 5]], [[2, 3]]]  # 6 classes in chunks of 2: rank r takes chunks r, r + 2


def _single(cfg, out):
    torch.set_num_threads(1)
    try:
        return run_chunked(EngineConfig(**cfg), _source(), out, progress=False)
    finally:
        torch.set_num_threads(2)

@pytest.mark.parametrize("make", [_sre2l, _dc], ids=["sre2l+metadd+robust", "dc+metadd+robust"])
def test_two_gloo_ranks_give_the_one_process_result(tmp_path, make):
    """Rank 0 trains and caches the zoo networks, rank 1 reads them; SRe2L's CVaR couples the
    chunks of a round across the ranks, DC's chunks are independent."""
    cfg = make(tmp_path)
    single = _single(cfg, str(tmp_path / "one"))
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "two"), cfg), nprocs=2, join=True)
    images, labels = torch.load(tmp_path / "two" / "synthetic.pt")["data"][0]
    assert torch.isfinite(images).all()
    assert torch.equal(images, single["images"]) and torch.equal(labels, single["labels"])
    assert images.shape == (12, *SHAPE) and not torch.equal(images[:2], images[2:4])
    if cfg.get("checkpoint_every"):  # each rank checkpoints its part of the round
        assert (tmp_path / "two" / "state.pt").exists() and (tmp_path / "two" / "state.rank1.pt").exists()
    trained = ["01_metadd_models_ConvNetD2.pt"] if cfg["method"] == "dc" else \
        ["00_teacher_ConvNetBN.pt", "02_metadd_models_ConvNetD2.pt"]  # zoo networks without a file
    assert sorted(os.listdir(tmp_path / "two" / "models")) == trained


@pytest.mark.parametrize("make", [_sre2l, _dc], ids=["sre2l", "dc"])
def test_the_metadd_term_acts(tmp_path, make):
    """With --metadd-weight the synthetic set differs, and its MetaDD loss (cross-architecture
    CAM variance under the run's own networks and global labels) is lower than without."""
    cfg = dict(make(tmp_path), metadd_weight=50.0, iterations=4)
    on = _single(cfg, str(tmp_path / "on"))["images"].clone()
    off = _single(dict(cfg, metadd_weight=0.0, metadd_models=()), str(tmp_path / "off"))["images"].clone()
    assert torch.isfinite(on).all() and not torch.equal(on, off)
    metadd = _load_networks(EngineConfig(**cfg), _source(), str(tmp_path / "on")).metadd
    labels = torch.arange(6).repeat_interleave(2)
    assert float(metadd(on, labels)) < 0.95 * float(metadd(off, labels))


SCRIPT = textwrap.dedent("""
    import json, sys, time, torch
    from metadd_fast import engine, sources
    torch.set_num_threads(1)
    cfg = engine.EngineConfig(**json.loads(sys.argv[3]))
    real_finish = engine.DISTILLERS[cfg.method].finish_step
    def slow_finish(self):  # slow enough to be killed mid-run
        time.sleep(0.15)
        return real_finish(self)
    engine.DISTILLERS[cfg.method].finish_step = slow_finish
    engine.run_chunked(cfg, sources.RandomSource(int(sys.argv[2]), 6, (3, 8, 8), seed=3), sys.argv[1],
                       progress=False)
""")


def _run(out, cfg, classes=6):
    return [sys.executable, "-c", SCRIPT, out, str(classes), json.dumps(cfg)]


@pytest.mark.parametrize("make", [_sre2l, _dc, _dm_zca], ids=["sre2l+metadd+robust", "dc+metadd+robust",
                                                               "dm+zca+metadd-zoo"])
def test_kill_9_mid_run_then_resume_gives_the_same_result(tmp_path, make):
    cfg = make(tmp_path)
    full = tmp_path / "full"
    subprocess.run(_run(str(full), cfg), check=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_run(str(killed), cfg))
    deadline = time.time() + 120
    while not (killed / "chunks" / "chunk_00000.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "synthetic.pt").exists(), "killed before the end"
    subprocess.run(_run(str(killed), cfg), check=True)
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
        run_chunked(EngineConfig(**dict(CFG, method="mtt")), _source(), str(tmp_path / "x"), progress=False)


MEMORY = textwrap.dedent("""
    import json, resource, sys, torch
    from metadd_fast import engine, sources
    torch.set_num_threads(1)
    cfg = engine.EngineConfig(**json.loads(sys.argv[3]))
    engine.run_chunked(cfg, sources.RandomSource(int(sys.argv[2]), 64, (3, 32, 32)), sys.argv[1],
                       progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


@pytest.mark.parametrize("method", ["dm", "sre2l", "dc"])
def test_memory_does_not_grow_with_the_number_of_classes(tmp_path, method):
    """SRe2L and DC with MetaDD (networks from state_dict files, as at scale) and robust DD."""
    peak = {}
    for classes in (20, 80):
        shape = (3, 32, 32)
        cfg = dict(ipc=2, iterations=1, classes_per_chunk=4, batch_real=16, arch="ConvNetD1", method=method)
        if method != "dm":
            cfg.update(robust_alpha=0.5, metadd_weight=1.0, metadd_models=tuple(
                f"{a}={_weights(tmp_path, a, classes, shape)}" for a in ("ConvNetD1", "ConvNetD2")))
        if method == "sre2l":
            cfg.update(teacher=f"ConvNetBN={_weights(tmp_path, 'ConvNetBN', classes, shape)}", cvar_chunks=2)
        out = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path / str(classes)), str(classes),
                              json.dumps(cfg)], capture_output=True, text=True, check=True)
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
    # Every real image (6 classes x 6) is in the group of one synthetic image of its class.
    sizes = torch.load(tmp_path / "two" / "groups.pt")["group_sizes"]
    assert torch.equal(sizes, single["group_sizes"]) and sizes.shape == (12,) and int(sizes.sum()) == 36
    assert all(int(sizes[2 * c:2 * c + 2].sum()) == 6 for c in range(6))
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


# ---- robust_groups: "class" or "all" (docs/methods.md "Groups over all classes") ----------------


def _in_memory(cfg: EngineConfig, ds: Dataset, teacher=None):
    """The in-memory distiller of a one-chunk run of ``cfg`` on ``ds`` (the engine's seed and
    label offset for chunk [0, ..]), after ``cfg.iterations`` steps."""
    kw = dict(teacher=teacher, init="noise") if cfg.method == "sre2l" else {}
    d = DISTILLERS[cfg.method](ds, cfg.ipc, batch_real=cfg.batch_real, arch=cfg.arch, robust_alpha=cfg.robust_alpha,
                               robust_groups=cfg.robust_groups, seed=cfg.seed * 1_000_003, **kw)
    for _ in range(cfg.iterations):
        d.step()
    return d


@pytest.mark.parametrize("groups", ["class", "all"])
@pytest.mark.parametrize("method", ["dm", "dc", "sre2l"])
def test_one_chunk_robust_run_equals_the_in_memory_distiller(tmp_path, method, groups):
    """One chunk of every class: the engine's coupled step (loss_terms + the CVaR over
    group_losses) gives the in-memory distiller's step() bit for bit, for either grouping, and
    groups.pt counts every real image in the group of its nearest final synthetic image (of its
    class, or of any class) in the engine's embedding (a fresh ``arch`` network, the teacher)."""
    teacher = dict(teacher=f"ConvNetBN={_weights(tmp_path, 'ConvNetBN')}") if method == "sre2l" else {}
    cfg = EngineConfig(**dict(CFG, method=method, classes_per_chunk=None, robust_alpha=0.5, robust_groups=groups,
                              **teacher))
    source = TensorSource(_source().dataset())
    ds = source.dataset()
    run = run_chunked(cfg, source, str(tmp_path / "run"), progress=False)
    net = _load_networks(cfg, source, str(tmp_path / "run")).teacher
    d = _in_memory(cfg, ds, net)
    assert torch.equal(run["images"], d.images.detach())
    if net is None:  # the engine's grouping network without a teacher or MetaDD networks
        torch.manual_seed(cfg.seed)
        net = get_model(cfg.arch, 3, 6, SHAPE[1:])
    with torch.no_grad():
        distances = torch.cdist(net.eval().embed(ds.images).flatten(1), net.embed(run["images"]).flatten(1))
    if groups == "class":
        distances[ds.labels[:, None] != run["labels"][None]] = float("inf")
    assert torch.equal(run["group_sizes"], torch.bincount(distances.argmin(1), minlength=12))


def _strays(k: int = 3) -> Dataset:
    """3 classes of random images (3, 8, 8), sorted by label: class 1 is 6 copies of one image
    x1, class 0 ``k`` copies of x1 (strays beside class 1) then its 6 images, class 2 its 6."""
    ds = _source(3).dataset()
    x1 = ds.images[6:7]
    images = torch.cat([x1.expand(k, *SHAPE), ds.images[:6], x1.expand(6, *SHAPE), ds.images[12:]])
    labels = torch.tensor([0] * (6 + k) + [1] * 6 + [2] * 6)
    return Dataset("strays", images.contiguous(), labels, 3, ds.mean, ds.std)


def test_all_groups_strays_with_the_nearest_class_and_a_resume_keeps_its_grouping(tmp_path):
    """At IPC 1 with the images left where they start (real images): "class" puts every real image
    in its class's one group; "all" puts class 0's copies of x1 in class 1's group (its image is x1).
    A run folder resumes only with the grouping it started with (run.json's identity)."""
    source = TensorSource(_strays(k=3))
    base = dict(CFG, ipc=1, iterations=1, lr=1e-9, classes_per_chunk=None, robust_alpha=0.5)
    by_class = run_chunked(EngineConfig(**base), source, str(tmp_path / "class"), progress=False)
    assert by_class["group_sizes"].tolist() == [9, 6, 6]
    x1 = source.ds.images[0]
    assert float((by_class["images"][0] - x1).abs().max()) > 1, "class 0's image starts on one of its own, not a stray"
    every = run_chunked(EngineConfig(**dict(base, robust_groups="all")), source, str(tmp_path / "all"),
                        progress=False)
    assert every["group_sizes"].tolist() == [6, 9, 6]
    assert torch.load(tmp_path / "all" / "groups.pt")["group_sizes"].tolist() == [6, 9, 6]
    with pytest.raises(ValueError, match=re.escape("holds a different run (differs in robust_groups)")):
        run_chunked(EngineConfig(**base), source, str(tmp_path / "all"), progress=False)
    assert json.load(open(tmp_path / "all" / "run.json"))["config"]["robust_groups"] == "all"


def test_all_groups_over_more_than_one_chunk_are_refused_before_anything_is_written(tmp_path):
    cfg = EngineConfig(**dict(CFG, robust_alpha=0.5, robust_groups="all"))  # 6 classes, 2 per chunk
    with pytest.raises(ValueError, match=re.escape("robust_groups: groups over every class need one chunk: drop "
                                                   "classes_per_chunk (got 2 for 6 classes)")):
        run_chunked(cfg, _source(), str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()
    EngineConfig(**dict(CFG, classes_per_chunk=6, robust_alpha=0.5, robust_groups="all")).check_classes(6)
    assert cfg.digest("k") != EngineConfig(**dict(CFG, robust_alpha=0.5)).digest("k")


@pytest.mark.parametrize("change, world, words", [
    (dict(cvar_chunks=3), 2, "cvar_chunks: the 3 chunks of a round cannot be split evenly over 2 ranks"),
    (dict(cvar_chunks=0), 1, "cvar_chunks: expected a positive int"),
    (dict(robust_alpha=1.5), 1, "alpha"),
    (dict(classes_per_chunk=0), 1, "classes_per_chunk"),
    (dict(pin_memory=True), 1, "pin_memory: pinned host memory serves a CUDA device"),
    (dict(method="mtt"), 1, "method: expected one of dm, dc, sre2l"),
    (dict(robust_alpha=None), 1, "cvar_chunks: coupling chunks needs robust_alpha"),
    (dict(robust_weight=0.0), 1, "robust_weight: expected a finite float > 0"),
    (dict(robust_groups="global"), 1, "robust_groups: expected one of 'class', 'all', got 'global'"),
    (dict(robust_alpha=None, cvar_chunks=1, robust_groups="all"), 1, "robust_groups: has no effect without "
                                                                     "robust_alpha"),
    (dict(method="sre2l"), 1, "teacher: sre2l needs a teacher"),
    (dict(teacher="ConvNetBN"), 1, "teacher: sre2l needs a teacher and only sre2l uses one"),
    (dict(metadd_weight=1.0, metadd_models=("ConvNet",)), 1, "metadd_models: MetaDD needs at least 2 networks"),
    (dict(metadd_models=("ConvNet", "LeNet")), 1, "metadd_weight: metadd_models and metadd_alpha act only"),
    (dict(metadd_alpha=0.5), 1, "metadd_weight: metadd_models and metadd_alpha act only"),
    (dict(metadd_precision="bf16"), 1, "metadd_precision: acts only with metadd_weight > 0"),
    (dict(metadd_weight=1.0, metadd_models=("ConvNet", "LeNet"), metadd_precision="half"), 1,
     "metadd_precision: expected one of fp32, bf16, fp16, got 'half'"),
    (dict(metadd_weight=-1.0), 1, "metadd_weight: expected a finite float >= 0"),
    (dict(metadd_weight=1.0, metadd_models=("ConvNet", "NoNet")), 1, "metadd_models: unknown zoo network 'NoNet'"),
    (dict(metadd_weight=1.0, metadd_models=("ConvNet", "LeNet=/no/such.pt")), 1, "metadd_models: /no/such.pt: no "),
    (dict(arch="NoNet"), 1, "arch: expected one of"),
])
def test_bad_engine_config_is_refused(change, world, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        EngineConfig(**dict(ROBUST, **change)).check(world)


def test_class_nearest_groups_streams_classes_and_matches_brute_force():
    torch.manual_seed(0)
    real = {c: torch.randn(n, 3, 5, 5) for c, n in ((4, 7), (9, 1), (2, 13))}
    synthetic = torch.randn(9, 3, 5, 5)
    net = torch.nn.Conv2d(3, 4, 3)
    asked = []
    ids = class_nearest_groups(net, lambda c: asked.append(c) or real[c], [4, 9, 2], synthetic, 3, batch_size=4)
    with torch.no_grad():
        want = torch.cat([torch.cdist(net(real[c]).flatten(1), net(synthetic[3 * i:3 * i + 3]).flatten(1)).argmin(1)
                          + 3 * i for i, c in enumerate([4, 9, 2])])
    assert asked == [4, 9, 2] and ids.dtype == torch.int64 and torch.equal(ids, want)
    with pytest.raises(ValueError, match="synthetic: expected 3 classes x 2 images"):
        class_nearest_groups(net, real.get, [4, 9, 2], synthetic, 2)


def test_device_and_pinning_do_not_change_the_run_identity():
    a = EngineConfig(**ROBUST)
    assert a.digest("k") == EngineConfig(**dict(ROBUST, device="cpu")).digest("k")
    assert a.digest("k") != EngineConfig(**dict(ROBUST, robust_alpha=0.4)).digest("k")


# ---- networks from the user's files ----------------------------------------------------------


class _Payload:
    """A pickled object that would run code when unpickled without weights_only."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_networks_load_from_state_dict_files_and_other_files_are_refused(tmp_path):
    path = _weights(tmp_path, "ConvNetBN", 6)
    net = load_model(parse_spec(f"ConvNetBN={path}", "--teacher"), "--teacher", channel=3, num_classes=6,
                     im_size=(8, 8))
    saved = torch.load(path, weights_only=True)
    assert not net.training and all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    nested = str(tmp_path / "nested.pt")
    torch.save({"state_dict": saved, "epoch": 3}, nested)
    load_model(parse_spec(f"ConvNetBN={nested}", "--teacher"), "--teacher", channel=3, num_classes=6, im_size=(8, 8))
    bad = {"code.pt": _Payload(), "list.pt": [torch.zeros(2)], "strings.pt": {"a": "b"}}
    for name, obj in bad.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ValueError, match=re.escape(f"--teacher: {tmp_path / name}: ")):
            load_model(parse_spec(f"ConvNetBN={tmp_path / name}", "--teacher"), "--teacher", channel=3,
                       num_classes=6, im_size=(8, 8))
    with pytest.raises(ValueError, match=re.escape(f"--metadd-models: {path} does not fit ConvNetD1=")):
        load_model(parse_spec(f"ConvNetD1={path}", "--metadd-models"), "--metadd-models", channel=3,
                   num_classes=6, im_size=(8, 8))
    cache = tmp_path / "cache.pt"
    cache.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=re.escape(f"{cache}: corrupt cached network")):
        load_model(parse_spec("ConvNetD1", "--metadd-models"), "--metadd-models", channel=3, num_classes=6,
                   im_size=(8, 8), train=_source(), cache=str(cache))
    with pytest.raises(ValueError, match="does not fit"):  # the right network for 10 classes, not 6
        load_model(parse_spec(f"ConvNetBN={path}", "--teacher"), "--teacher", channel=3, num_classes=10,
                   im_size=(8, 8))


def test_library_networks_need_a_local_file_and_an_importable_library(tmp_path):
    with pytest.raises(ValueError, match=r"--teacher: torchvision:resnet18 needs a local weights file"):
        parse_spec("torchvision:resnet18", "--teacher")
    with pytest.raises(ValueError, match=r"--teacher: unknown source 'hub'"):
        parse_spec("hub:resnet18=x.pt", "--teacher")
    path = _weights(tmp_path, "ConvNetD1")
    try:
        import torchvision  # noqa: F401
    except Exception:  # not importable here (the CPU torch): the clear refusal
        with pytest.raises(ValueError, match=r"--teacher: torchvision:resnet18=.*: torchvision does not import"):
            load_model(parse_spec(f"torchvision:resnet18={path}", "--teacher"), "--teacher", channel=3,
                       num_classes=6, im_size=(8, 8))
    else:  # importable: the file (a ConvNet's) does not fit a resnet18
        with pytest.raises(ValueError, match="does not fit torchvision:resnet18"):
            load_model(parse_spec(f"torchvision:resnet18={path}", "--teacher"), "--teacher", channel=3,
                       num_classes=6, im_size=(8, 8))


def test_cli_engine_runs_metadd_and_refuses_what_it_would_ignore(tmp_path, capsys):
    """On the digits (1 channel, 16x16, 10 classes): --metadd-weight changes the chunked result;
    flags the engine would not read end in exit 2 naming the flag."""
    a, b = (_weights(tmp_path, arch, 10, (1, 16, 16)) for arch in ("ConvNetD1", "LeNet"))
    base = ["distill", "--method", "dm", "--ipc", "1", "--iterations", "1", "--batch-real", "4",
            "--arch", "ConvNetD1", "--classes-per-chunk", "5"]
    models = ["--metadd-models", f"ConvNetD1={a},LeNet={b}"]
    assert main(base + ["--out", str(tmp_path / "off")]) == 0
    assert main(base + ["--metadd-weight", "1", *models, "--out", str(tmp_path / "on")]) == 0
    off, on = (torch.load(tmp_path / f / "synthetic.pt")["data"][0][0] for f in ("off", "on"))
    assert torch.isfinite(on).all() and not torch.equal(on, off)
    capsys.readouterr()
    refused = [(base + models, "--metadd-models: has no effect without --metadd-weight > 0"),
               (base + ["--metadd-alpha", "0.5"], "--metadd-alpha: has no effect without --metadd-weight"),
               (base + ["--teacher", "ConvNetBN"], "--teacher: only --method sre2l uses a teacher"),
               (base + ["--cvar-chunks", "2"], "--cvar-chunks: couples chunks under robust DD's CVaR"),
               (base + ["--robust-alpha", "2"], "--robust-alpha: expected a float in (0, 1]"),
               (base[:-2] + ["--teacher", "ConvNetBN"], "--teacher: only --method sre2l uses a teacher"),
               (base[:-2] + ["--cvar-chunks", "2"], "--cvar-chunks: applies to the large-IPC engine only"),
               (base[:-1] + ["0"], "--classes-per-chunk: expected a positive int")]
    for argv, words in refused:
        try:
            code = main(argv + ["--out", str(tmp_path / "refused")])
        except SystemExit as exit_:  # argparse's own refusal
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and words in err and "Traceback" not in err, (argv, err)


# ---- ImageNet-form networks ------------------------------------------------------------------


# torchvision's resnet18 / mobilenet_v2: parameter counts, state_dict sizes, and names of each part.
TORCHVISION = {
    "ResNet18ImageNet": (11_689_512, 122, ["conv1.weight", "bn1.running_var", "layer1.1.conv2.weight",
                                           "layer2.0.downsample.0.weight", "layer4.0.downsample.1.num_batches_tracked",
                                           "fc.weight", "fc.bias"]),
    "MobileNetV2": (3_504_872, 314, ["features.0.0.weight", "features.0.1.running_mean", "features.1.conv.0.0.weight",
                                     "features.1.conv.1.weight", "features.2.conv.0.0.weight",
                                     "features.2.conv.1.0.weight", "features.17.conv.3.bias", "features.18.0.weight",
                                     "classifier.1.weight"]),
}


@pytest.mark.parametrize("arch", sorted(TORCHVISION))
def test_imagenet_form_networks_have_torchvision_layouts(tmp_path, arch):
    params, entries, names = TORCHVISION[arch]
    net = get_model(arch, 3, 1000, (224, 224))
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == params and len(state) == entries
    assert all(n in state for n in names), [n for n in names if n not in state]
    # A torchvision-named state_dict file round-trips into a fresh network through the loader.
    for v in state.values():
        if v.is_floating_point():
            v.normal_()
    path = str(tmp_path / "tv.pt")
    torch.save(state, path)
    again = load_model(parse_spec(f"{arch}={path}", "--teacher"), "--teacher", channel=3, num_classes=1000,
                       im_size=(224, 224))
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())


@pytest.mark.parametrize("cls, kw, channels", [(ResNet18ImageNet, {}, 512), (MobileNetV2, dict(width=0.35), 1280)])
def test_imagenet_form_networks_shapes_cams_metadd_and_sre2l(cls, kw, channels):
    torch.manual_seed(0)
    net = cls(channel=3, num_classes=5, **kw).eval()
    for size, fmap in ((64, 2), (33, 2), (96, 3)):
        x = torch.randn(2, 3, size, size)
        assert net(x).shape == (2, 5) and net.embed(x).shape == (2, channels)
        t = cam_target(net)
        t.probe(x)
        A, logits = t.run(x)
        assert t.kind == "linear" and A.shape == (2, channels, fmap, fmap)
        # The head is linear over the pooled map: logits = fc(mean A), the CAM's premise.
        head = net.fc if cls is ResNet18ImageNet else net.classifier[1]
        torch.testing.assert_close(logits, head(A.mean(dim=(2, 3))))
    other = cls(channel=3, num_classes=5, **kw)
    x = torch.randn(3, 3, 64, 64, requires_grad=True)
    loss = mf.MetaDDLoss([net, other])(x, torch.tensor([0, 3, 4]))
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and loss > 0 and torch.isfinite(g).all() and g.abs().sum() > 0
    # As SRe2L's teacher (BatchNorm statistics from a few real batches).
    real = Dataset("r", torch.randn(12, 3, 40, 40), torch.arange(3).repeat_interleave(4), 3, (0.0,) * 3, (1.0,) * 3)
    teacher = cls(channel=3, num_classes=3, **kw).train()
    with torch.no_grad():
        teacher(real.images)
    d = SRe2L(real, 2, teacher=teacher, seed=0, augment=None)
    before = d.images.detach().clone()
    terms = d.step()
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values()) and not torch.equal(d.images, before)


def test_metadd_precision_reaches_the_loss(tmp_path):
    """metadd_precision is the MetaDD loss's precision (its networks under autocast) and part
    of the run's identity (a run resumes only with the same precision)."""
    cfg = dict(_dc(tmp_path), metadd_precision="bf16")
    assert _load_networks(EngineConfig(**cfg), _source(), str(tmp_path)).metadd.precision == "bf16"
    assert EngineConfig(**cfg).digest("k") != EngineConfig(**dict(cfg, metadd_precision="fp32")).digest("k")
