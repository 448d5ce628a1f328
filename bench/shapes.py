"""Parameter shapes of the benchmark models, written from the architectures (no torchvision).

Each model is a list of parameter shapes in `model.parameters()` order, so the optimizer sees
the same tensors, in the same order, as it does in training. Convolutions have no bias (a
BatchNorm follows each one); each BatchNorm contributes a weight and a bias of its width.

- `resnet18`, `resnet34`: the CIFAR-10 variant used by the paper (3x3 stride-1 stem conv with
  64 filters, no max-pool, BasicBlocks, fc 512 -> 10).
- `resnet50`, `resnet101`, `resnet152`: torchvision's ImageNet models (7x7 stem conv,
  Bottleneck blocks with expansion 4, 1x1 downsample conv + BN, fc 2048 -> 1000).
- `tiny`: a few odd-sized tensors of every rank (0-d to 4-d) for smoke tests.
"""
from __future__ import annotations

import math

import torch

Shape = tuple[int, ...]


def _conv_bn(c_out: int, c_in: int, k: int) -> list[Shape]:
    return [(c_out, c_in, k, k), (c_out,), (c_out,)]


def _basic_block(c_in: int, planes: int, downsample: bool) -> list[Shape]:
    shapes = _conv_bn(planes, c_in, 3) + _conv_bn(planes, planes, 3)
    if downsample:
        shapes += _conv_bn(planes, c_in, 1)
    return shapes


def _bottleneck(c_in: int, planes: int, downsample: bool) -> list[Shape]:
    c_out = planes * 4
    shapes = _conv_bn(planes, c_in, 1) + _conv_bn(planes, planes, 3) + _conv_bn(c_out, planes, 1)
    if downsample:
        shapes += _conv_bn(c_out, c_in, 1)
    return shapes


def _resnet(block, expansion: int, blocks_per_stage, stem: list[Shape], num_classes: int):
    shapes = list(stem)
    c_in = 64
    for stage, n_blocks in enumerate(blocks_per_stage):
        planes = 64 * 2**stage
        stride = 1 if stage == 0 else 2
        for i in range(n_blocks):
            # torchvision's rule: a block whose stride or width changes gets a 1x1 conv + BN
            # shortcut; only a stage's first block can (stage 1 of a BasicBlock net has none).
            downsample = i == 0 and (stride != 1 or c_in != planes * expansion)
            shapes += block(c_in, planes, downsample)
            c_in = planes * expansion
    return shapes + [(num_classes, c_in), (num_classes,)]


_CIFAR_STEM = _conv_bn(64, 3, 3)
_IMAGENET_STEM = _conv_bn(64, 3, 7)

MODELS: dict[str, list[Shape]] = {
    "tiny": [(7, 5, 3, 3), (7,), (7,), (33, 7 * 9), (33,), (), (1000,), (3, 4, 5)],
    "resnet18": _resnet(_basic_block, 1, (2, 2, 2, 2), _CIFAR_STEM, 10),
    "resnet34": _resnet(_basic_block, 1, (3, 4, 6, 3), _CIFAR_STEM, 10),
    "resnet50": _resnet(_bottleneck, 4, (3, 4, 6, 3), _IMAGENET_STEM, 1000),
    "resnet101": _resnet(_bottleneck, 4, (3, 4, 23, 3), _IMAGENET_STEM, 1000),
    "resnet152": _resnet(_bottleneck, 4, (3, 8, 36, 3), _IMAGENET_STEM, 1000),
}


def numel(shapes: list[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)


def units(shapes: list[Shape]) -> int:
    """Number of `unit`-level groups (docs/algorithm.md: dim-0 slices; a 0-d tensor is one unit)."""
    return sum(s[0] if s else 1 for s in shapes)


def make_params(shapes, device="cpu", dtype=torch.float32, seed=0) -> list[torch.Tensor]:
    """Leaf tensors with requires_grad, drawn like a freshly initialised net (small values)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [
        (0.05 * torch.randn(s, generator=gen)).to(device=device, dtype=dtype).requires_grad_()
        for s in shapes
    ]


def make_grads(shapes, device="cpu", dtype=torch.float32, seed=1) -> list[torch.Tensor]:
    """Random gradients with no zero element.

    Zero gradients would let an implementation skip work (or make every hyper-gradient sum
    zero), and tiny ones would put denormals into Adam's v (slow on CPUs), so each element's
    magnitude is at least 1e-3 while its sign stays random.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    grads = []
    for s in shapes:
        g = torch.randn(s, generator=gen)
        g = torch.where(g >= 0, g + 1e-3, g - 1e-3)
        grads.append(g.to(device=device, dtype=dtype))
    return grads
