"""The benchmark's parameter sets match the real networks, and its gradients are usable."""
import pytest
import torch

from bench.shapes import MODELS, make_grads, make_params, numel

# torchvision's counts for the ImageNet models; the CIFAR ones as in the paper's code base.
EXPECTED = {
    "resnet18": (62, 11_173_962),
    "resnet34": (110, 21_282_122),
    "resnet50": (161, 25_557_032),
    "resnet101": (314, 44_549_160),
    "resnet152": (467, 60_192_808),
}


@pytest.mark.parametrize("model", EXPECTED)
def test_parameter_counts(model):
    assert (len(MODELS[model]), numel(MODELS[model])) == EXPECTED[model]


def test_resnet50_order_and_shapes():
    shapes = MODELS["resnet50"]
    assert shapes[:3] == [(64, 3, 7, 7), (64,), (64,)]  # stem conv, bn1
    # layer1.0: conv1..bn3, then its downsample conv + bn (torchvision's named_parameters order)
    assert shapes[3:15] == [(64, 64, 1, 1), (64,), (64,), (64, 64, 3, 3), (64,), (64,),
                            (256, 64, 1, 1), (256,), (256,), (256, 64, 1, 1), (256,), (256,)]
    assert shapes[-2:] == [(1000, 2048), (1000,)]


def test_tensors_match_shapes_and_grads_have_no_zeros():
    shapes = MODELS["tiny"]
    params = make_params(shapes, dtype=torch.float64)
    grads = make_grads(shapes, dtype=torch.float64)
    assert [tuple(p.shape) for p in params] == [tuple(g.shape) for g in grads] == shapes
    assert all(p.requires_grad and p.is_leaf and p.dtype == torch.float64 for p in params)
    assert all(bool((g != 0).all()) for g in grads)
