"""The models: the paper's feed-forward net, LeNet-5, the CIFAR ResNet-18 of the digits runs
and torchvision's ResNet-50 layout (the --throughput model)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def feed_forward() -> nn.Module:
    """The paper's MNIST MLP shape on 8x8 digits: 64-100-100-10."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def lenet5() -> nn.Module:
    """LeNet-5 on 32x32 inputs: conv5(6)-pool-conv5(16)-pool-120-84-10 (ReLU, max-pooling)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    # No conv bias: the BatchNorm after it has one.
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(c_in, planes, 3, stride), nn.ReLU(inplace=True), *_conv_bn(planes, planes, 3))
        self.shortcut = _shortcut(c_in, planes, stride)

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision), 1x1 expand x4 (ResNet-50)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(c_in, planes, 1), nn.ReLU(inplace=True),
            *_conv_bn(planes, planes, 3, stride), nn.ReLU(inplace=True),
            *_conv_bn(planes, planes * 4, 1),
        )
        self.shortcut = _shortcut(c_in, planes * 4, stride)

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))


class ResNet(nn.Module):
    """A stem, four stages of residual blocks (widths w, 2w, 4w, 8w; stride 2 from the
    second stage on), global average pooling and a linear classifier."""

    def __init__(self, stem: nn.Module, block, blocks_per_stage, width: int, num_classes: int):
        super().__init__()
        self.stem = stem
        blocks, c_in = [], width
        for stage, n_blocks in enumerate(blocks_per_stage):
            for i in range(n_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(block(c_in, width * 2**stage, stride))
                c_in = width * 2**stage * block.expansion
        self.stages = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


def cifar_resnet18(width: int = 16, in_channels: int = 1, num_classes: int = 10) -> ResNet:
    """The paper's CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool); width 64 is the
    original, the digits runs use 16 so that they train on two CPU cores."""
    stem = nn.Sequential(*_conv_bn(in_channels, width, 3), nn.ReLU(inplace=True))
    return ResNet(stem, BasicBlock, (2, 2, 2, 2), width, num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    """torchvision's ResNet-50 layout and parameter shapes, built without torchvision."""
    stem = nn.Sequential(*_conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
    return ResNet(stem, Bottleneck, (3, 4, 6, 3), 64, num_classes)

