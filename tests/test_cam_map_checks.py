"""Networks whose CAM map is 1x1 or constant are refused or warned about, by name, in MetaDDLoss."""
import pytest
import torch
from torch import nn

import metadd_fast as mf
from metadd_fast.models import get_model


class _PooledNet(nn.Module):
    """torchvision's features/classifier layout whose last feature map is 1x1 (as DC's VGG11 or
    MobileNetV2 at 32x32) or, with ``upsample``, a constant 2x2 map."""

    def __init__(self, upsample: bool = False):
        super().__init__()
        layers = [nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)]
        self.features = nn.Sequential(*layers, *([nn.Upsample(scale_factor=2)] if upsample else []))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 if upsample else 4, 3))

    def forward(self, x):
        return self.classifier(self.features(x))


def _images():
    torch.manual_seed(0)
    return torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])


def test_a_network_with_a_1x1_map_is_refused_by_name():
    loss = mf.MetaDDLoss([get_model("ConvNetD1", 1, 3, (16, 16)), _PooledNet()])
    with pytest.raises(ValueError, match=r"models\[1\] \(_PooledNet\) gives a 1x1 CAM map on 16x16 images"):
        loss(*_images())


def test_a_network_with_a_constant_map_is_warned_about_by_name():
    loss = mf.MetaDDLoss([get_model("ConvNetD1", 1, 3, (16, 16)), _PooledNet(upsample=True)])
    with pytest.warns(UserWarning, match=r"models\[1\] \(_PooledNet\): its 2x2 CAM feature map is constant"):
        value = loss(*_images())
    assert torch.isfinite(value)


def test_zoo_networks_pass_without_a_warning(recwarn):
    loss = mf.MetaDDLoss([get_model(n, 1, 3, (16, 16)) for n in ("ConvNetD1", "LeNet", "AlexNet")])
    loss(*_images())
    assert not [w for w in recwarn if "CAM" in str(w.message)]
