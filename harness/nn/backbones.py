"""Shared feature extractors. Each maps images (B, C, H, W) in [0, 1] to (B, out_dim).

- convnet: a small 2-conv CNN (the size of Avalanche's QuickDraw peer runs);
- convnet_bn: 6 conv+BN layers, 16/32/64 channels, global average pool (75K parameters):
  the QuickDraw/Fashion-MNIST recipe's backbone (harness/cil/recipes.py says why);
- resnet32: the CIFAR ResNet-32 of iCaRL/PyCIL, trained from scratch;
- resnet18: torchvision's ResNet-18 with a 3x3 stem for small images;
- efficientnet_lite0: ImageNet-pretrained EfficientNet-Lite0 from a PyPI package.
"""
from __future__ import annotations

import torch
from avalanche.models import IncrementalClassifier
from torch import nn

from harness.registry import BACKBONES
from harness.errors import HarnessError


def backbone(name: str):
    """Decorator: fn(in_channels=, image_size=) -> nn.Module with `out_dim`, as backbone `name`."""
    def deco(fn):
        return BACKBONES.register(name, fn)

    return deco


def backbone_names() -> list[str]:
    return BACKBONES.names()


def create_backbone(name: str, in_channels: int, image_size: int) -> nn.Module:
    """Build a backbone by name; it exposes `out_dim`."""
    factory = BACKBONES.get(name)  # an unknown name: one line with the known ones
    # Channels-last weights make oneDNN run the convolutions in NHWC (conv outputs follow the
    # weights' layout): on 2 CPU cores training 1.1-1.3x and evaluation 1.0-2.4x faster for
    # every backbone here (README, "Speed").
    net = factory(in_channels=in_channels, image_size=image_size)
    return net.to(memory_format=torch.channels_last)


class ConvNet(nn.Module):
    def __init__(self, in_channels: int, image_size: int, width: int = 32, hidden: int = 256):
        super().__init__()
        side = image_size // 4
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * side * side, hidden), nn.ReLU(inplace=True),
        )
        self.out_dim = hidden

    def forward(self, x):
        return self.features(x)


@backbone("convnet")
def convnet(in_channels: int, image_size: int) -> nn.Module:
    return ConvNet(in_channels, image_size)


class ConvNetBN(nn.Module):
    """Three stages of two 3x3 conv + BN + ReLU, 2x2 max-pool between stages, global average pool."""

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            for cin in (in_channels, w):
                layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            in_channels = w
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = widths[-1]

    def forward(self, x):
        return self.pool(self.body(x)).flatten(1)

    def stage_maps(self, x) -> list[torch.Tensor]:
        """Each stage's output feature map, before the pooling that follows it (PODNet distils them)."""
        maps = []
        for layer in self.body:
            if isinstance(layer, nn.MaxPool2d):
                maps.append(x)
            x = layer(x)
        return [*maps, x]


@backbone("convnet_bn")
def convnet_bn(in_channels: int, image_size: int) -> nn.Module:
    return ConvNetBN(in_channels)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else nn.Identity()
        )

    last_relu = True  # LUCIR drops it in the network's last block (drop_last_relu)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return torch.relu(out) if self.last_relu else out


class CifarResNet(nn.Module):
    """ResNet-6n+2 for 32x32 images (He et al. 2016, section 4.2): 16/32/64 channels."""

    def __init__(self, in_channels: int, depth: int = 32):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        layers, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            for j in range(n):
                layers.append(_BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 64

    def feature_map(self, x):
        """Output of the last convolutional block (used by attention methods)."""
        return self.layers(self.stem(x))

    def forward(self, x):
        return self.pool(self.feature_map(x)).flatten(1)

    def stage_maps(self, x) -> list[torch.Tensor]:
        """Each stage's output feature map (16, 32, 64 channels), as PyCIL's resnet32 returns its `fmaps`."""
        x, maps, n = self.stem(x), [], len(self.layers) // 3
        for i in range(3):
            x = self.layers[i * n:(i + 1) * n](x)
            maps.append(x)
        return maps


@backbone("resnet32")
def resnet32(in_channels: int, image_size: int) -> nn.Module:
    return CifarResNet(in_channels, depth=32)


class _LastStage(nn.Module):
    """A network's last stage + global average pool: features from the earlier stages' feature map."""

    def __init__(self, body: nn.Module, out_dim: int):
        super().__init__()
        self.body, self.pool, self.out_dim = body, nn.AdaptiveAvgPool2d(1), out_dim

    def forward(self, x):
        return self.pool(self.body(x)).flatten(1)


def split_last_stage(net: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the earlier stages, the last stage with the pool) of a three-stage network: MEMO's generalised
    and specialised blocks (PyCIL's memo_resnet32 puts stages 1-2 in the first, stage 3 in the second)."""
    if isinstance(net, ConvNetBN):
        cut = len(net.body) - 6  # the last stage: two conv + BN + ReLU
        return net.body[:cut], _LastStage(net.body[cut:], net.out_dim)
    if isinstance(net, CifarResNet):
        cut = 2 * len(net.layers) // 3
        return nn.Sequential(net.stem, net.layers[:cut]), _LastStage(net.layers[cut:], net.out_dim)
    raise HarnessError(f"{type(net).__name__} has no generalised/specialised split: use convnet_bn or resnet32")


def drop_last_relu(net: nn.Module) -> nn.Module:
    """`net` without the ReLU after its last layer, so its features take either sign (LUCIR, Hou et al.
    2019, section 4.1: "the ReLU in the penultimate layer is removed"; FACIL's BasicBlockNoRelu)."""
    if isinstance(net, ConvNetBN) and isinstance(net.body[-1], nn.ReLU):
        net.body[-1] = nn.Identity()
    elif isinstance(net, CifarResNet):
        net.layers[-1].last_relu = False
    else:
        raise HarnessError(f"{type(net).__name__}: no last ReLU to drop; use convnet_bn or resnet32")
    return net


@backbone("resnet18")
def resnet18(in_channels: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(weights=None)
    if image_size <= 64:  # keep resolution on small images: 3x3 stem, no max-pool
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    net.fc = nn.Identity()
    net.out_dim = 512
    return net


@backbone("efficientnet_lite0")
def efficientnet_lite0(in_channels: int, image_size: int) -> nn.Module:
    from harness.nn.pretrained import EfficientNetLite0Features

    # ImageNet weights expect ~224 px: small images are upsampled inside the module.
    return EfficientNetLite0Features(in_channels=in_channels, image_size=max(image_size, 224), pretrained=True)


def resize_incremental_head(head: IncrementalClassifier, n: int) -> None:
    """Give an IncrementalClassifier `n` outputs, so a saved state dict of that size loads (checkpoints)."""
    head.classifier = nn.Linear(head.classifier.in_features, n)
    head.active_units = torch.zeros(n, dtype=torch.int8)


class IncrementalNet(nn.Module):
    """Backbone + Avalanche's IncrementalClassifier (grows when new classes arrive)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = IncrementalClassifier(backbone.out_dim, initial_out_features=1)

    def features(self, x):
        return self.backbone(x)

    def resize_head(self, n: int) -> None:
        resize_incremental_head(self.head, n)

    def forward(self, x):
        return self.head(self.backbone(x))
