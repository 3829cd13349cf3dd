"""nearest_centroid / kmeans / grouping against float64 oracles (docs/ops.md section 5).

Exactness contract under test: the index equals the float64 oracle's on every row,
near-tied centroids included (rows the float32 expansion cannot separate are
re-checked in float64); sqdist is within 1e-5 relative (float32 inputs) of the
float64 minimum distance.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import metadd_fast as mf
from metadd_fast import grouping, reference


def oracle(x, c):
    """float64 direct distances, lowest index on ties."""
    d = ((x.double()[:, None, :] - c.double()[None, :, :]) ** 2).sum(-1)
    return d.argmin(1), d.min(1).values


def check(backend, x, c, tol=1e-5):
    index, sqdist = mf.nearest_centroid(x, c, backend=backend)
    want_i, want_d = oracle(x, c)
    assert index.dtype == torch.int64 and sqdist.dtype == x.dtype
    assert torch.equal(index, want_i), f"{int((index != want_i).sum())} rows differ"
    assert torch.all(sqdist >= 0)
    assert torch.allclose(sqdist.double(), want_d, rtol=tol, atol=tol * float(want_d.max()) * 1e-3)


@pytest.mark.parametrize("D", [1, 3, 64, 130])
@pytest.mark.parametrize("N, M", [(1, 1), (37, 5), (200, 97), (129, 130)])
def test_random_data(fused_backend, N, M, D):
    check(fused_backend, torch.randn(N, D), torch.randn(M, D))


def test_well_separated_centroids(fused_backend):
    c = torch.randn(11, 16) * 20
    x = c[torch.randint(0, 11, (300,))] + torch.randn(300, 16)
    check(fused_backend, x, c)


@pytest.mark.parametrize("D", [3, 64, 130])
def test_near_tied_centroids_are_settled_exactly(fused_backend, D):
    c = torch.randn(40, D)
    c[7] = c[3] + 3e-6 * torch.randn(D)  # closer than float32 can separate from most points
    c[20] = c[3]  # an exact duplicate: ties go to the lowest index (3)
    x = torch.cat([c[3] + 1e-3 * torch.randn(50, D), torch.randn(50, D)])
    x[:10] = (c[3] + c[7]) / 2 + 1e-6 * torch.randn(10, D)  # equidistant to float32 rounding
    check(fused_backend, x, c)
    assert not torch.any(mf.nearest_centroid(x, c, backend=fused_backend)[0] == 20)


def test_several_row_blocks_and_centroid_tiles(fused_backend):
    """N and M past the C++ kernel's 256-row blocks and 512-centroid tiles, with exact
    duplicates in the same tile (100, 130) and in a later one (900): the lowest index wins."""
    c = torch.randn(1100, 8)
    c[130] = c[100]
    c[900] = c[100]
    x = torch.cat([c[100] + 1e-2 * torch.randn(40, 8), torch.randn(300, 8)])
    check(fused_backend, x, c)
    index = mf.nearest_centroid(x, c, backend=fused_backend)[0]
    assert torch.all(index[:40] == 100)


def test_float64_and_half_inputs(fused_backend):
    x, c = torch.randn(100, 24, dtype=torch.float64), torch.randn(30, 24, dtype=torch.float64)
    check(fused_backend, x, c, tol=1e-12)
    xh, ch = torch.randn(100, 24).bfloat16(), torch.randn(30, 24).bfloat16()
    index, sqdist = mf.nearest_centroid(xh, ch, backend=fused_backend)
    want_i, want_d = oracle(xh, ch)
    assert torch.equal(index, want_i) and sqdist.dtype == torch.bfloat16
    assert torch.allclose(sqdist.double(), want_d, rtol=2e-2)


def test_nan_rows_stay_alone(fused_backend):
    x, c = torch.randn(50, 8), torch.randn(9, 8)
    x[4, 2] = float("nan")
    index, sqdist = mf.nearest_centroid(x, c, backend=fused_backend)
    assert torch.isnan(sqdist[4])
    keep = torch.arange(50) != 4
    want_i, _ = oracle(x[keep], c)
    assert torch.equal(index[keep], want_i)


def test_inputs_not_written(fused_backend):
    x, c = torch.randn(60, 5), torch.randn(7, 5)
    before = x.clone(), c.clone()
    mf.nearest_centroid(x, c, backend=fused_backend)
    assert torch.equal(x, before[0]) and torch.equal(c, before[1])


@pytest.mark.parametrize("args, exc, words", [
    ((torch.randn(4, 3), torch.randn(5, 2)), ValueError, "centroids: expected D = 3 columns like x, got 2"),
    ((torch.randn(0, 3), torch.randn(5, 3)), ValueError, "x: expected a non-empty tensor"),
    ((torch.randn(4, 3), torch.randn(0, 3)), ValueError, "centroids: expected a non-empty tensor"),
    ((torch.arange(12).view(4, 3), torch.randn(5, 3)), TypeError, "x: expected a floating tensor"),
    ((torch.randn(4, 3), torch.randn(5, 3).int()), TypeError, "centroids: expected a floating tensor"),
    ((torch.randn(4), torch.randn(5, 3)), ValueError, "x: expected a 2-D"),
    ((torch.randn(4, 3), torch.randn(5, 3, device="meta")), ValueError, "centroids: expected a tensor on cpu"),
])
def test_bad_inputs(args, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        mf.nearest_centroid(*args)


def test_opcheck_and_compile():
    x, c = torch.randn(40, 6), torch.randn(9, 6)
    torch.library.opcheck(torch.ops.metadd_fast.nearest_centroid.default, (x, c),
                          test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda a, b: mf.nearest_centroid(a, b)[1].sum(), fullgraph=True)
    assert torch.allclose(fn(x, c).double(), oracle(x, c)[1].sum(), rtol=1e-5)


def test_memory_stays_linear_at_200k_by_5k():
    # A distance matrix would be 200,000 x 5,000 x 4 B = 4 GB; the op may use O((N + M) D).
    code = textwrap.dedent("""
        import resource, torch, metadd_fast as mf
        g = torch.Generator().manual_seed(0)
        x, c = torch.randn(200_000, 128, generator=g), torch.randn(5_000, 128, generator=g)
        mf.nearest_centroid(x[:1000], c)  # warm-up: thread pool, allocator
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        index, sqdist = mf.nearest_centroid(x, c)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
    """)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    extra = int(out.stdout.split()[-1])
    assert extra < 64e6, f"peak memory grew by {extra / 1e6:.0f} MB"


# ---- k-means ---------------------------------------------------------------------------


def blobs(k=6, per=150, D=5, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, D, generator=g) * 8
    x = centres.repeat_interleave(per, 0) + spread * torch.randn(k * per, D, generator=g)
    return x[torch.randperm(k * per, generator=g)], centres


def test_kmeans_recovers_known_centres(fused_backend):
    x, centres = blobs()
    C, index = mf.kmeans(x, 6, seed=3, backend=fused_backend)
    match = torch.cdist(centres, C).argmin(1)
    assert sorted(match.tolist()) == list(range(6)), "every true centre has its own cluster"
    assert torch.allclose(C[match], centres, atol=0.1)
    assert torch.equal(index, mf.nearest_centroid(x, C)[0])


def test_kmeans_equals_reference_loop_from_same_init(fused_backend):
    x, _ = blobs(k=4, per=60, D=3, spread=2.0, seed=1)
    init = x[:7].clone()
    C, index = mf.kmeans(x, 7, init=init, iters=30, backend=fused_backend)
    C_ref, index_ref = reference.kmeans(x.double(), init.double(), iters=30)
    assert torch.equal(index, index_ref)
    assert torch.allclose(C.double(), C_ref, atol=1e-5)


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_kmeans_reproducible_for_a_seed(init):
    x, _ = blobs(seed=2)
    a = mf.kmeans(x, 5, init=init, seed=11)
    b = mf.kmeans(x, 5, init=init, seed=11)
    c = mf.kmeans(x, 5, init=init, seed=12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_kmeans_reseeds_empty_clusters_deterministically():
    x = torch.cat([torch.zeros(50, 2), torch.ones(50, 2) * 10, torch.tensor([[30.0, 30.0]])])
    init = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-100.0, -100.0]])  # the third starts empty
    C, index = mf.kmeans(x, 3, init=init, iters=5)
    assert torch.equal(index.bincount(minlength=3), torch.tensor([50, 50, 1]))
    assert torch.equal(C[2], torch.tensor([30.0, 30.0]))


@pytest.mark.parametrize("kw, exc, words", [
    (dict(k=0), ValueError, "k: expected an int in [1, 20], got 0"),
    (dict(k=21), ValueError, "k: expected an int in [1, 20], got 21"),
    (dict(k=2.0), TypeError, "k: expected an int"),
    (dict(k=2, iters=0), ValueError, "iters"),
    (dict(k=2, tol=-1.0), ValueError, "tol"),
    (dict(k=2, init="kmeans"), ValueError, "init"),
    (dict(k=2, init=torch.zeros(3, 4)), ValueError, "init: expected a tensor of shape (2, 4), got shape (3, 4)"),
    (dict(k=2, init=torch.full((2, 4), float("nan"))), ValueError, "init: expected finite values"),
    (dict(k=2, seed=1.5), TypeError, "seed"),
    (dict(k=2, seed=2 ** 70), ValueError, "seed: expected an int in [0, 2**63 - 1]"),
])
def test_kmeans_bad_inputs(kw, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        mf.kmeans(torch.randn(20, 4), **kw)
    with pytest.raises(ValueError, match="x: expected a non-empty tensor"):
        mf.kmeans(torch.randn(0, 4), 1)
    with pytest.raises(TypeError, match="x: expected a floating tensor"):
        mf.kmeans(torch.zeros(5, 4, dtype=torch.int64), 1)


# ---- grouping ---------------------------------------------------------------------------


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2))

    def forward(self, x):
        return self.net(x)


def test_nearest_groups_match_full_embedding_and_keep_model_state():
    net = Embedder().train()
    real, synthetic = torch.randn(70, 1, 8, 8), torch.randn(9, 1, 8, 8)
    ids = grouping.nearest_groups(net, real, synthetic, batch_size=16)
    assert net.training, "the model's mode is restored"
    with torch.no_grad():
        net.eval()
        want = oracle(net(real).flatten(1), net(synthetic).flatten(1))[0]
    assert torch.equal(ids, want)
    loader = [(real[i:i + 25], torch.zeros(25)) for i in range(0, 70, 25)]  # (images, labels) batches
    assert torch.equal(grouping.nearest_groups(net, loader, synthetic), want)


def test_kmeans_groups_and_embed():
    net = Embedder()
    real = torch.randn(64, 1, 8, 8)
    e = grouping.embed(net, real, batch_size=10)
    assert e.shape == (64, 16) and e.dtype == torch.float32
    ids, C = grouping.kmeans_groups(net, real, 4, batch_size=10, seed=0)
    assert ids.shape == (64,) and C.shape == (4, 16)
    assert torch.equal(ids, mf.nearest_centroid(e, C)[0])
    loss = mf.cvar(torch.rand(64), 0.25, ids, 4)  # the groups feed the CVaR
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="batch_size"):
        grouping.embed(net, real, batch_size=0)
    with pytest.raises(TypeError, match="net"):
        grouping.embed("model", real)
