"""The library's public API refuses bad arguments by name before any work (docs/api_checks.md):
the examples of issue 23, each with its message."""
import math
import re

import pytest
import torch

from metadd_fast import data, grouping, kmeans
from metadd_fast.distill import DC, DM, SRe2L
from metadd_fast.engine import EngineConfig
from metadd_fast.errors import InputError, InputTypeError
from metadd_fast.models import ConvNet


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(0)
    return data.Dataset("tiny", torch.randn(12, 1, 8, 8, generator=g), torch.arange(3).repeat_interleave(4), 3,
                        (0.0,), (1.0,))


def refused(kind, message, f, *args, **kw):
    with pytest.raises(kind, match="^" + re.escape(message)) as info:
        f(*args, **kw)
    assert isinstance(info.value, InputError)


def test_distiller_counts_and_floats(tiny):
    refused(InputError, "batch_real: expected an int >= 1, got -1", DM, tiny, 2, batch_real=-1)
    refused(InputError, "lr: expected a finite float > 0, got nan", DM, tiny, 2, lr=math.nan)
    refused(InputTypeError, "ipc: expected an int >= 1, got bool", DM, tiny, True)
    refused(InputError, "seed: expected an int in [0, 2**63 - 1], got 1180591620717411303424", DM, tiny, 2,
            seed=2 ** 70)
    refused(InputError, "robust_alpha: expected a finite float in (0, 1], got 1.5", DM, tiny, 2, robust_alpha=1.5)
    refused(InputError, "inner_steps: expected an int >= 0, got -1", DC, tiny, 2, inner_steps=-1)
    refused(InputError, "augment: expected operation names joined by '_'", DM, tiny, 2, augment="blur")
    refused(InputTypeError, "real: expected a metadd_fast.data.Dataset, got a torch.float32 tensor of shape (12, 1, 8, 8)",
            DM, tiny.images, 2)


def test_arguments_without_effect_are_refused(tiny):
    refused(InputError, "robust_weight: has no effect without robust_alpha", DM, tiny, 2, robust_weight=2.0)
    refused(InputError, "lr_net: has no effect with inner_steps=0", DC, tiny, 2, inner_steps=0, lr_net=0.1)
    refused(InputError, "embedding: has no effect without robust_alpha", DC, tiny, 2, embedding=lambda x: x)
    teacher = ConvNet(1, 3, width=8, depth=1, norm="batchnorm", im_size=(8, 8)).eval()
    refused(InputError, "teacher: expected (1, >= 5) logits", SRe2L, tiny, 2, teacher=teacher, label_offset=2)


def test_state_dict_of_another_ipc_or_method_is_refused(tiny):
    d = DM(tiny, 2, batch_real=4, augment=None)
    d.step()
    other = DM(tiny, 3, batch_real=4, augment=None)
    refused(InputError, "state: images of shape (9, 1, 8, 8), expected (6, 1, 8, 8) (3 classes x ipc 2)",
            d.load_state_dict, other.state_dict())
    dc = DC(tiny, 2, batch_real=4, augment=None)
    refused(InputError, "state: expected a DC.state_dict() (keys images, optimizer, iteration, gen, net)",
            dc.load_state_dict, d.state_dict())
    before = d.images.detach().clone()
    refused(InputError, "state['iteration']: expected an int >= 0, got -1", d.load_state_dict,
            {**DM(tiny, 2, augment=None).state_dict(), "iteration": -1})
    assert torch.equal(d.images, before) and d.iteration == 1  # nothing loaded
    d.load_state_dict(d.state_dict())


def test_grouping_kmeans_and_loaders():
    net = ConvNet(1, 3, width=8, depth=1, im_size=(8, 8))
    refused(InputTypeError, "synthetic: expected a floating tensor, got torch.int64", grouping.nearest_groups, net,
            torch.randn(4, 1, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.int64))
    refused(InputError, "real: the network cannot take a batch of shape (4, 3, 8, 8)", grouping.nearest_groups, net,
            torch.randn(4, 3, 8, 8), torch.randn(2, 1, 8, 8))
    refused(InputError, "seed: expected an int in [0, 2**63 - 1], got 1180591620717411303424", kmeans,
            torch.randn(5, 2), 2, seed=2 ** 70)
    refused(InputError, "x: expected finite values, got NaN or Inf", kmeans, torch.tensor([[math.nan], [0.0]]), 1)
    refused(InputError, "size: expected an int in [8, 1024], got 10000", data.load_digits, size=10 ** 4)
    refused(InputError, "path: has no effect for digits", data.load, "digits", path="/tmp")
    refused(InputError, "size: cifar10 images are 32x32", data.load, "cifar10", path="/tmp", size=16)


def test_image_folder_refuses_absurd_sizes_before_decoding(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "0.png")
    refused(InputError, "size: expected an int or a pair (H, W) of ints in [1, 4096], got 100000",
            data.load_image_folder, str(tmp_path), 10 ** 5)
    assert data.load_image_folder(str(tmp_path), (4, 6)).images.shape == (1, 3, 4, 6)


def test_engine_config_names_its_fields():
    refused(InputError, "seed: expected an int in [0, 2**63 - 1], got -1", EngineConfig(seed=-1).check, 1)
    refused(InputTypeError, "pin_memory: expected a bool, got int", EngineConfig(pin_memory=1).check, 1)
    refused(InputError, "robust_weight: has no effect without robust_alpha", EngineConfig(robust_weight=2.0).check, 1)
    refused(InputError, "world: expected an int >= 1, got 0", EngineConfig().check, 0)
