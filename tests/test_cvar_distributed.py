"""cvar(process_group=...) on 2 gloo processes equals one process holding all values."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

import metadd_fast as mf

N, NUM_GROUPS, SPLIT = 41, 9, 17  # uneven shards: rank 0 holds values[:17], rank 1 the rest
CONFIGS = [(backend, use_groups, alpha) for backend in ("cpp", "triton") for use_groups in (False, True)
           for alpha in (0.1, 0.37, 1.0)]


def _data():
    g = torch.Generator().manual_seed(1234)
    values = torch.randint(0, 6, (N,), generator=g).double() / 3  # exact ties across ranks
    groups = torch.randint(0, NUM_GROUPS - 1, (N,), generator=g)  # the last group stays empty
    return values, groups


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        values, groups = _data()
        part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, N)
        results = []
        for backend, use_groups, alpha in CONFIGS:
            v = values[part].clone().requires_grad_()
            g = groups[part] if use_groups else None
            loss = mf.cvar(v, alpha, g, NUM_GROUPS if use_groups else None, process_group=dist.group.WORLD,
                           backend=backend)
            loss.backward(torch.tensor(1.3, dtype=loss.dtype))
            results.append((loss.detach(), v.grad))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_gloo_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    values, groups = _data()
    for i, (backend, use_groups, alpha) in enumerate(CONFIGS):
        v = values.clone().requires_grad_()
        g = groups if use_groups else None
        loss = mf.cvar(v, alpha, g, NUM_GROUPS if use_groups else None, backend=backend)
        loss.backward(torch.tensor(1.3, dtype=loss.dtype))
        for r in range(2):
            assert torch.equal(ranks[r][i][0], loss.detach()), (backend, use_groups, alpha, r)
        grad = torch.cat([ranks[0][i][1], ranks[1][i][1]])
        assert torch.allclose(grad, v.grad, rtol=1e-12, atol=0), (backend, use_groups, alpha)
        assert v.grad.abs().sum() > 0


def test_a_rank_without_values_must_name_the_groups():
    with pytest.raises(ValueError, match="num_groups: needed when this rank has no values"):
        mf.cvar(torch.zeros(0), 0.5, torch.zeros(0, dtype=torch.int64), process_group=object())
    with pytest.raises(ValueError, match="values: expected a non-empty tensor"):
        mf.cvar(torch.zeros(0), 0.5)  # only a rank of a distributed CVaR may be empty
