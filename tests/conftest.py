"""Test setup. TRITON_INTERPRET must be set before any @triton.jit function is defined,
so that the Triton kernels run on CPU tensors in the tests."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import metadd_fast  # noqa: E402

FUSED = [b for b in ("cpp", "triton") if metadd_fast.available(b)]


@pytest.fixture(params=FUSED)
def fused_backend(request):
    """Each fused backend available here (both in CI)."""
    return request.param


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test: fresh random inputs for every case."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """Every torch.empty (ours, the C++ kernels' at::empty, the Triton launchers') is filled
    with NaN, so an output element a kernel forgets to write fails the comparison."""
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)
