"""The DC model zoo that dataset-distillation codebases share, written for metadd_fast.

Every model takes (B, channel, H, W) images for 1 or 3 channels and the input sizes
its pooling allows, returns (B, num_classes) logits, and names its CAM layer and
head: ``cam_layer`` (the module whose output is the last feature map) and
``cam_head`` (the classifier, or None where the head is an MLP and Grad-CAM weights
are used). ``embed(x)`` gives the features the classifier sees, for grouping.

- ConvNet (width 128, depth 3, instance norm, average pooling, flatten head),
  ConvNetD1-D4 (depth 1-4) and ConvNetW32 (width 32: the demo's CPU-sized ConvNet).
- AlexNet (DC's 5-conv variant, flatten head).
- VGG11 (instance norm; the head is a flatten head over the last 2x2 map at 32x32,
  where DC adds one more max-pool before a 512-wide linear layer).
- ResNet18 (BasicBlocks, instance norm, global average pooling + linear head) and
  ResNet18_AP (strides replaced by average pooling, flatten head).
- LeNet (MLP head: Grad-CAM).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvNet", "AlexNet", "VGG11", "ResNet18", "ResNet18_AP", "LeNet", "MODELS", "get_model"]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm: expected 'instancenorm', 'batchnorm' or 'none', got {kind!r}")


def _flat_size(features: nn.Module, channel: int, im_size) -> int:
    with torch.no_grad():
        return features(torch.zeros(1, channel, *im_size)).numel()


class _Zoo(nn.Module):
    """features -> flatten -> classifier, with the CAM layer and head named."""

    cam_layer = "features"
    cam_head = "classifier"

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


class ConvNet(_Zoo):
    def __init__(self, channel: int = 3, num_classes: int = 10, width: int = 128, depth: int = 3,
                 norm: str = "instancenorm", pooling: str = "avgpooling", im_size=(32, 32)):
        super().__init__()
        layers, c = [], channel
        for d in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=3 if channel == 1 and d == 0 else 1), _norm(norm, width),
                       nn.ReLU(inplace=True)]
            if pooling == "avgpooling":
                layers.append(nn.AvgPool2d(2, 2))
            elif pooling == "maxpooling":
                layers.append(nn.MaxPool2d(2, 2))
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(_flat_size(self.features, channel, im_size), num_classes)


class AlexNet(_Zoo):
    def __init__(self, channel: int = 3, num_classes: int = 10, im_size=(32, 32)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channel, 128, 5, padding=4 if channel == 1 else 2), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(192, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 192, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
        )
        self.classifier = nn.Linear(_flat_size(self.features, channel, im_size), num_classes)


class VGG11(_Zoo):
    CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)

    def __init__(self, channel: int = 3, num_classes: int = 10, norm: str = "instancenorm", im_size=(32, 32)):
        super().__init__()
        layers, c = [], channel
        for i, v in enumerate(self.CFG):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=3 if channel == 1 and i == 0 else 1), _norm(norm, v),
                           nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(_flat_size(self.features, channel, im_size), num_classes)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, avgpool: bool):
        super().__init__()
        self.pool = stride != 1 and avgpool  # ResNet_AP: stride 1 convolution, then 2x2 average pooling
        conv_stride = 1 if avgpool else stride
        self.conv1 = nn.Conv2d(cin, cout, 3, conv_stride, 1, bias=False)
        self.bn1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            down = [nn.Conv2d(cin, cout, 1, conv_stride, bias=False)]
            if self.pool:
                down.append(nn.AvgPool2d(2, 2))
            self.shortcut = nn.Sequential(*down, _norm(norm, cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        if self.pool:
            out = F.avg_pool2d(out, 2, 2)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _ResNet(nn.Module):
    cam_layer = "layer4"
    cam_head = "classifier"

    def __init__(self, channel: int, num_classes: int, norm: str, avgpool: bool, im_size):
        super().__init__()
        self.conv1 = nn.Conv2d(channel, 64, 3, 1, 1, bias=False)
        self.bn1 = _norm(norm, 64)
        cin, layers = 64, []
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(_BasicBlock(cin, cout, stride, norm, avgpool),
                                        _BasicBlock(cout, cout, 1, norm, avgpool)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.flatten_head = avgpool
        with torch.no_grad():
            fmap = self._fmap(torch.zeros(1, channel, *im_size))
        self.classifier = nn.Linear(fmap.numel() if avgpool else fmap.shape[1], num_classes)

    def _fmap(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))

    def embed(self, x):
        fmap = self._fmap(x)
        return fmap.flatten(1) if self.flatten_head else fmap.mean(dim=(2, 3))

    def forward(self, x):
        return self.classifier(self.embed(x))


class ResNet18(_ResNet):
    """ResNet-18 (DC's CIFAR form): global average pooling and a linear head."""

    def __init__(self, channel: int = 3, num_classes: int = 10, norm: str = "instancenorm", im_size=(32, 32)):
        super().__init__(channel, num_classes, norm, avgpool=False, im_size=im_size)


class ResNet18_AP(_ResNet):
    """ResNet-18 with average-pooling downsampling and a flatten head."""

    def __init__(self, channel: int = 3, num_classes: int = 10, norm: str = "instancenorm", im_size=(32, 32)):
        super().__init__(channel, num_classes, norm, avgpool=True, im_size=im_size)


class LeNet(_Zoo):
    cam_head = None  # an MLP head: Grad-CAM weights

    def __init__(self, channel: int = 3, num_classes: int = 10, im_size=(32, 32)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channel, 6, 5, padding=2 if channel == 1 else 0), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
        )
        self.classifier = nn.Sequential(nn.Linear(_flat_size(self.features, channel, im_size), 120),
                                        nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True),
                                        nn.Linear(84, num_classes))


MODELS = {
    "ConvNet": ConvNet,
    "ConvNetD1": partial(ConvNet, depth=1),
    "ConvNetD2": partial(ConvNet, depth=2),
    "ConvNetD3": partial(ConvNet, depth=3),
    "ConvNetD4": partial(ConvNet, depth=4),
    "ConvNetW32": partial(ConvNet, width=32),
    "AlexNet": AlexNet,
    "VGG11": VGG11,
    "ResNet18": ResNet18,
    "ResNet18_AP": ResNet18_AP,
    "LeNet": LeNet,
}


def get_model(name: str, channel: int = 3, num_classes: int = 10, im_size=(32, 32)) -> nn.Module:
    """A zoo model by name (``MODELS``), for ``channel``-channel images of ``im_size``."""
    if name not in MODELS:
        raise ValueError(f"name: expected one of {', '.join(MODELS)}, got {name!r}")
    return MODELS[name](channel=channel, num_classes=num_classes, im_size=tuple(im_size))
