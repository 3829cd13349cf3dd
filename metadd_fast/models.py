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
- ConvNetBN: ConvNet with BatchNorm (SRe2L's default teacher on small images).
- ResNet18ImageNet and MobileNetV2: ImageNet-form networks (stride-2 stems, BatchNorm,
  global average pooling + linear head) in torchvision's layout and parameter names, so
  torchvision state_dicts load; they cost what torchvision's do (the CIFAR-form ResNet18
  above keeps full resolution through its first stage: about 15x at 224x224).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from . import argcheck
from .errors import InputError, first_line

__all__ = ["ConvNet", "AlexNet", "VGG11", "ResNet18", "ResNet18_AP", "LeNet", "ResNet18ImageNet", "MobileNetV2",
           "MODELS", "get_model"]


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

    def __init__(self, channel: int, num_classes: int, norm: str, avgpool: bool, im_size, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(channel, width, 3, 1, 1, bias=False)
        self.bn1 = _norm(norm, width)
        cin, layers = width, []
        for cout, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
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
    """ResNet-18 (DC's CIFAR form): global average pooling and a linear head. ``width``: the
    first stage's channels (64; the stages have width, 2, 4 and 8 x width)."""

    def __init__(self, channel: int = 3, num_classes: int = 10, norm: str = "instancenorm", im_size=(32, 32),
                 width: int = 64):
        super().__init__(channel, num_classes, norm, avgpool=False, im_size=im_size, width=width)


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


# ---- ImageNet-form networks (torchvision layouts and parameter names) ----------------------


class _INBasicBlock(nn.Module):
    """torchvision's BasicBlock: conv1/bn1/conv2/bn2 and a ``downsample`` (conv 1x1, bn) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18ImageNet(nn.Module):
    """ResNet-18 in its ImageNet form: 7x7 stride-2 stem, 3x3 stride-2 max-pool, four stages
    of BasicBlocks (BatchNorm), global average pooling, ``fc``. Module and parameter names
    are torchvision's, so a torchvision ``resnet18`` state_dict loads (strict). Input
    (B, channel, H, W) with H, W >= 33 (the map after the stem and 3 strides is H/32);
    output (B, num_classes). CAM layer ``layer4`` (B, 512, H/32, W/32), head ``fc``."""

    cam_layer = "layer4"
    cam_head = "fc"

    def __init__(self, channel: int = 3, num_classes: int = 1000, im_size=(224, 224)):
        super().__init__()
        self.conv1 = nn.Conv2d(channel, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = 64, []
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(_INBasicBlock(cin, cout, stride), _INBasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def embed(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.avgpool(self.layer4(self.layer3(self.layer2(self.layer1(x))))).flatten(1)

    def forward(self, x):
        return self.fc(self.embed(x))


def _divisible(v: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding: the nearest multiple of ``divisor``, never below 90% of v."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):
    """1x1 expansion (unless t = 1), 3x3 depthwise, linear 1x1 projection; identity shortcut
    when the shape is kept. torchvision's layout (``conv`` holds the layers)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn_relu6(cin, hidden, 1)] if expand != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """A MobileNetV2-style network: stride-2 3x3 stem, inverted residual blocks
    (expansion t, channels c, repeats n, first stride s), a 1x1 conv to 1280 (times
    ``width`` when above 1), global average pooling and a linear head (``classifier``:
    dropout, linear). BatchNorm and ReLU6 throughout; module and parameter names are
    torchvision's ``mobilenet_v2``. Input (B, channel, H, W) with H, W >= 17 (the map is
    H/32); output (B, num_classes). CAM layer ``features`` (B, 1280, H/32, W/32), head
    ``classifier``."""

    cam_layer = "features"
    cam_head = "classifier"
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, channel: int = 3, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2,
                 im_size=(224, 224)):
        super().__init__()
        cin, last = _divisible(32 * width), _divisible(1280 * max(1.0, width))
        layers = [_conv_bn_relu6(channel, cin, 3, 2)]
        for t, c, n, s in self.SETTINGS:
            cout = _divisible(c * width)
            for i in range(n):
                layers.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn_relu6(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def embed(self, x):
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


MODELS = {
    "ConvNet": ConvNet,
    "ConvNetBN": partial(ConvNet, norm="batchnorm"),
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
    "ResNet18ImageNet": ResNet18ImageNet,
    "MobileNetV2": MobileNetV2,
}


def get_model(name: str, channel: int = 3, num_classes: int = 10, im_size=(32, 32)) -> nn.Module:
    """A zoo model by name (``MODELS``), for ``channel``-channel images of ``im_size`` (an int
    side or (H, W)); InputError naming ``im_size`` where the network cannot take such images."""
    argcheck.choice("name", name, tuple(MODELS))
    argcheck.positive_int("channel", channel, 1 << 16)
    argcheck.positive_int("num_classes", num_classes, 1 << 24)
    im_size = argcheck.image_size("im_size", im_size)
    try:
        return MODELS[name](channel=channel, num_classes=num_classes, im_size=im_size)
    except (RuntimeError, ValueError) as err:  # the network's probe of its flattened size fails
        raise InputError(f"im_size: {name} cannot take {channel}-channel {im_size[0]}x{im_size[1]} images "
                         f"({first_line(err)})") from err
