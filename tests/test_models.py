"""Reference architectures and the model registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anybit.models import BasicBlock, CifarResNet, UnknownModelError, available, create, register


def _params(model):
    return sum(p.numel() for p in model.parameters())


# ResNet-20, width 1, 1x1-conv shortcuts on the two stride-2 stages, 10 classes, 3 input channels:
#   stem conv 3*16*9 = 432, BN 2*16 = 32                                          ->     464
#   stage 1, 3 blocks x (conv 16*16*9 = 2304 + BN 32) x 2 = 3 x 4672               ->  14 016
#   stage 2, block 0: 16*32*9 = 4608 + 64 + 32*32*9 = 9216 + 64 + 1x1 16*32 = 512 + 64 = 14 528
#            blocks 1, 2: 2 x (9216 + 64) x 2 = 2 x 18 560 = 37 120                ->  51 648
#   stage 3, block 0: 32*64*9 = 18 432 + 128 + 64*64*9 = 36 864 + 128 + 32*64 = 2048 + 128 = 57 728
#            blocks 1, 2: 2 x (36 864 + 128) x 2 = 2 x 73 984 = 147 968            -> 205 696
#   fc 64*10 + 10 = 650
#   total 464 + 14 016 + 51 648 + 205 696 + 650 = 272 474
# ResNet-32 (5 blocks/stage): 464 + 5*4672 + (14 528 + 4*18 560) + (57 728 + 4*73 984) + 650 = 466 906
# ResNet-56 (9 blocks/stage): 464 + 9*4672 + (14 528 + 8*18 560) + (57 728 + 8*73 984) + 650 = 855 770
@pytest.mark.parametrize("name,expected", [("resnet20", 272_474), ("resnet32", 466_906), ("resnet56", 855_770)])
def test_cifar_resnet_parameter_counts(name, expected):
    assert _params(create(name)) == expected


def test_resnet20_structure_and_forward():
    model = create("resnet20")
    assert isinstance(model, CifarResNet)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    shortcuts = [b for b in blocks if len(b.shortcut) > 0]
    assert len(shortcuts) == 2
    assert all(b.shortcut[0].kernel_size == (1, 1) and b.shortcut[0].stride == (2, 2) for b in shortcuts)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.anybit_meta == {"arch": "resnet20", "arch_kwargs": {}}


def test_width_multiplier_scales_channels():
    model = create("resnet20", width=5)
    assert model.conv1.out_channels == 80
    assert model.layer1[0].conv2.out_channels == 80
    assert model.layer2[0].conv1.out_channels == 160
    assert model.layer3[2].conv2.out_channels == 320
    assert model.fc.in_features == 320
    # conv weights scale with width^2: stem 3*80*9, a stage-3 conv 320*320*9
    assert model.conv1.weight.numel() == 2160 and model.layer3[1].conv1.weight.numel() == 921_600
    assert model.anybit_meta["arch_kwargs"] == {"width": 5}
    half = create("resnet20", width=0.5)
    assert [half.conv1.out_channels, half.layer2[0].conv1.out_channels, half.fc.in_features] == [8, 16, 32]


def test_in_channels_and_num_classes():
    model = create("resnet20", in_channels=1, num_classes=100).eval()
    assert model.conv1.in_channels == 1 and model.fc.out_features == 100
    assert model.conv1.weight.shape == (16, 1, 3, 3)
    with torch.no_grad():
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 100)
    # 272 474 - stem 2*16*9 (two fewer input channels) + 90 * 65 (fc 64 -> 100 with bias instead of 10)
    assert _params(model) == 272_474 - 288 + 90 * 65


@pytest.mark.parametrize("depth", [21, 6, 0, 19])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth)


def test_bad_width():
    with pytest.raises(ValueError, match="width"):
        create("resnet20", width=0)


def test_unknown_model_names_suggest():
    with pytest.raises(UnknownModelError, match="did you mean 'resnet20'"):
        create("resnt20")
    with pytest.raises(UnknownModelError, match="resnet56"):
        create("resnet_56")
    with pytest.raises(UnknownModelError, match="torchvision"):
        create("torchvision.resnet181")
    assert issubclass(UnknownModelError, ValueError)
    with pytest.raises(ValueError, match="depth"):  # a keyword the builder does not take
        create("resnet20", depth=32)


def test_available_and_register():
    assert {"resnet20", "resnet32", "resnet44", "resnet56"} <= set(available())
    register("tiny_test_model", lambda hidden=3: nn.Linear(2, hidden))
    try:
        model = create("tiny_test_model", hidden=4)
        assert model.out_features == 4
        assert model.anybit_meta == {"arch": "tiny_test_model", "arch_kwargs": {"hidden": 4}}
        assert "tiny_test_model" in available()
    finally:
        from anybit.models import registry

        registry._REGISTRY.pop("tiny_test_model", None)


def test_torchvision_via_registry():
    model = create("torchvision.resnet18", num_classes=7)
    assert type(model).__name__ == "ResNet" and model.fc.out_features == 7
    assert model.anybit_meta == {"arch": "torchvision.resnet18", "arch_kwargs": {"num_classes": 7}}
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(ValueError, match="3 input channels"):
        create("torchvision.resnet18", in_channels=1)
