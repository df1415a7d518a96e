"""Precision control: set_precision forms, bad bits, the precision context, switchable BatchNorm,
and quantizable_layers' parameter and MAC counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import anybit
from anybit import BitsError
from anybit.models import create
from anybit.quant import NotConvertedError, PrecisionNotTrainedError, QuantSpec, SwitchableBatchNorm, quant_layers


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _resnet(**spec):
    return anybit.convert(create("resnet20", width=0.25), **{"keep_first_last": None, **spec})  # nothing pinned


def _uniform(model):
    return set(anybit.get_precision(model).values())


def test_set_precision_forms():
    model = _resnet()
    assert _uniform(model) == {(32, 32)}
    assert anybit.set_precision(model, 4) is model
    assert _uniform(model) == {(4, 4)}
    anybit.set_precision(model, (2, 8))
    assert _uniform(model) == {(2, 8)}
    anybit.set_precision(model, [3, 5])
    assert _uniform(model) == {(3, 5)}
    anybit.set_precision(model, {"w": 6, "a": 7})
    assert _uniform(model) == {(6, 7)}
    anybit.set_precision(model, {"w": 6})  # the missing side is float
    assert _uniform(model) == {(6, 32)}
    anybit.set_precision(model, w=4, a=8)
    assert _uniform(model) == {(4, 8)}
    anybit.set_precision(model, a=2)
    assert _uniform(model) == {(32, 2)}
    anybit.set_precision(model, w=5)
    assert _uniform(model) == {(5, 32)}
    anybit.set_precision(model, None)
    assert _uniform(model) == {(32, 32)}
    anybit.set_precision(model, 16)
    assert _uniform(model) == {(16, 16)}
    layer = model.layer2[1].conv1
    assert (layer.w_bits, layer.a_bits) == (16, 16)


def test_per_layer_map():
    model = _resnet()
    anybit.set_precision(model, 8)
    anybit.set_precision(model, {"conv1": 2, "layer1.0.conv1": (3, 4), "fc": {"w": 5, "a": 6}})
    prec = anybit.get_precision(model)
    assert prec["conv1"] == (2, 2) and prec["layer1.0.conv1"] == (3, 4) and prec["fc"] == (5, 6)
    assert prec["layer1.0.conv2"] == (8, 8)  # unnamed layers keep their bits
    assert sum(p == (8, 8) for p in prec.values()) == len(prec) - 3


def test_unknown_layer_names_get_a_hint():
    model = _resnet()
    anybit.set_precision(model, 8)
    with pytest.raises(ValueError, match=r"did you mean 'layer1\.0\.conv[12]'") as info:
        anybit.set_precision(model, {"layer1.0.conv": 4, "fc": 2})
    assert "layer1.0.conv" in str(info.value)
    assert _uniform(model) == {(8, 8)}  # nothing changed
    with pytest.raises(ValueError, match="quantizable_layers"):
        anybit.set_precision(model, {"zzz_totally_unknown": 4})



@pytest.mark.parametrize("bad", [0, 17, 33, -1, True, 4.0, "4", 64])
def test_bad_bits_raise_bits_error(bad):
    model = _resnet()
    anybit.set_precision(model, 4)
    for call in (
        lambda: anybit.set_precision(model, bad),
        lambda: anybit.set_precision(model, (bad, 4)),
        lambda: anybit.set_precision(model, (4, bad)),
        lambda: anybit.set_precision(model, {"w": bad, "a": 4}),
        lambda: anybit.set_precision(model, w=bad),
        lambda: anybit.set_precision(model, w=4, a=bad),
        lambda: anybit.set_precision(model, {"conv1": bad}),
        lambda: anybit.set_precision(model, {"conv1": (4, bad)}),
        lambda: model.fc.set_bits(bad, 4),
    ):
        with pytest.raises(BitsError):
            call()
    assert _uniform(model) == {(4, 4)}  # a failed call leaves the precision as it was
    assert issubclass(BitsError, ValueError)


def test_bits_and_keywords_are_exclusive_and_bad_shapes():
    model = _resnet()
    with pytest.raises(BitsError, match="not both"):
        anybit.set_precision(model, 4, w=4)
    with pytest.raises(BitsError):
        anybit.set_precision(model, (4, 4, 4))
    with pytest.raises(BitsError):
        anybit.set_precision(model, {"conv1": (4,)})
    with pytest.raises(NotConvertedError):
        anybit.set_precision(create("resnet20", width=0.25), 4)


def test_precision_context_restores_on_exit_and_on_error():
    model = _resnet(keep_first_last=8)
    anybit.set_precision(model, {"layer1.0.conv1": (2, 3)})
    before = anybit.get_precision(model)
    with anybit.precision(model, w=4, a=8) as m:
        assert m is model
        assert anybit.get_precision(model)["layer2.0.conv1"] == (4, 8)
        assert anybit.get_precision(model)["conv1"] == (8, 8)  # pinned
        with anybit.precision(model, 2):
            assert anybit.get_precision(model)["layer2.0.conv1"] == (2, 2)
        assert anybit.get_precision(model)["layer2.0.conv1"] == (4, 8)
    assert anybit.get_precision(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with anybit.precision(model, {"fc": 3}):
            assert anybit.get_precision(model)["fc"] == (3, 3)
            raise RuntimeError("boom")
    assert anybit.get_precision(model) == before
    assert model.fc.pinned == (8, 8)
    with pytest.raises(BitsError):  # a bad precision changes nothing
        with anybit.precision(model, 33):
            pass
    assert anybit.get_precision(model) == before


# ----------------------------------------------------------------------------------------------
# switchable BatchNorm

BN_BITS = (1, 2, 4, 8, 32)


def _bn_params(model):
    return sum(p.numel() for n, m in model.named_modules()
               if isinstance(m, nn.BatchNorm2d) for p in m.parameters(recurse=False))


def test_switchable_bn_has_one_bn_per_precision_and_switches():
    shared = _resnet()
    switch = _resnet(bn="switchable", bn_bits=BN_BITS)
    assert _bn_params(switch) == 5 * _bn_params(shared) > 0
    report = anybit.conversion_report(switch)
    assert "bn1" in report["switchable_bn"] and "layer2.0.shortcut.1" in report["switchable_bn"]
    bn = switch.layer1[0].bn1
    assert isinstance(bn, SwitchableBatchNorm) and sorted(bn.bns.keys()) == sorted(["1", "2", "4", "8", "32"])
    assert bn.active == "32"
    anybit.set_precision(switch, 4)
    assert all(m.active == "4" for m in switch.modules() if isinstance(m, SwitchableBatchNorm))
    # the active BN really is the one used
    switch.eval()
    h = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        for key in ("4", "8"):
            switch.bn1.bns[key].bias.copy_(torch.full((4,), float(key)))
        assert torch.equal(switch.bn1(h), switch.bn1.bns["4"](h))
        with anybit.precision(switch, 8):
            assert switch.bn1.active == "8"
            assert torch.equal(switch.bn1(h), switch.bn1.bns["8"](h))
        assert switch.bn1.active == "4"
        assert not torch.equal(switch.bn1.bns["4"](h), switch.bn1.bns["8"](h))
    # whole model at 32 bits (float): only the 32-bit BNs matter
    x = torch.randn(2, 3, 8, 8)
    anybit.set_precision(switch, 32)
    with torch.no_grad():
        out32 = switch(x)
        switch.layer3[2].bn2.bns["2"].bias.add_(1.0)
        assert torch.equal(switch(x), out32)
        switch.layer3[2].bn2.bns["32"].bias.add_(1.0)
        assert not torch.equal(switch(x), out32)
    # training mode updates only the active precision's statistics
    switch.train()
    anybit.set_precision(switch, 4)
    for m in switch.modules():
        if isinstance(m, anybit.quant.ActQuantizer):
            m.init_range(-3.0, 3.0)
    before = switch.bn1.bns["8"].running_mean.clone()
    switch(x)
    assert torch.equal(switch.bn1.bns["8"].running_mean, before)
    assert not torch.equal(switch.bn1.bns["4"].running_mean, torch.zeros_like(before))


def test_switchable_bn_untrained_precision_errors_clearly():
    model = _resnet(bn="switchable", bn_bits=BN_BITS)
    model.eval()
    for m in model.modules():
        if isinstance(m, anybit.quant.ActQuantizer):
            m.init_range(-3.0, 3.0)
    anybit.set_precision(model, 3)
    with pytest.raises(PrecisionNotTrainedError, match=r"no statistics for precision '3'.*re-estimate"):
        model(torch.randn(1, 3, 8, 8))
    anybit.set_precision(model, w=4, a=8)
    with pytest.raises(PrecisionNotTrainedError, match="w4a8"):
        model(torch.randn(1, 3, 8, 8))


def test_switchable_bn_rejects_non_uniform_maps():
    model = _resnet(bn="switchable", bn_bits=BN_BITS, keep_first_last=8)
    anybit.set_precision(model, 8)
    names = list(quant_layers(model))
    with pytest.raises(BitsError, match="uniform"):
        anybit.set_precision(model, {names[1]: 2, names[2]: 4})
    # a partial map that would leave the model non-uniform is rejected too
    with pytest.raises(BitsError, match="uniform"):
        anybit.set_precision(model, {names[1]: 4})
    assert _uniform(model) == {(8, 8)}
    assert model.bn1.active == "8"
    # a map that makes every (unpinned) layer 4-bit is accepted and switches the BNs
    anybit.set_precision(model, {n: 4 for n in names[1:-1]})
    assert model.bn1.active == "4" and anybit.get_precision(model)["conv1"] == (8, 8)
    # the full map as saved (pinned layers at their pinned bits) is accepted as well
    full = anybit.get_precision(model)
    anybit.set_precision(model, 2)
    anybit.set_precision(model, full)
    assert model.bn1.active == "4" and anybit.get_precision(model) == full


def test_spec_validation():
    with pytest.raises(ValueError, match="bn_bits"):
        QuantSpec(bn="switchable")
    with pytest.raises(BitsError):
        QuantSpec(bn="switchable", bn_bits=(4, 0))
    with pytest.raises(BitsError):
        QuantSpec(keep_first_last=33)
    with pytest.raises(ValueError, match="unknown"):
        QuantSpec.from_dict({"weight": "dorefa", "colour": "red"})
    spec = QuantSpec(bn="switchable", bn_bits=[1, 2], skip=["fc"])
    assert spec.bn_bits == (1, 2) and spec.skip == ("fc",)
    assert QuantSpec.from_dict(spec.to_dict()) == spec


# ----------------------------------------------------------------------------------------------
# quantizable_layers


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # 10x10 -> 10x10
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, bias=False)  # 10x10 -> 5x5
        self.fc = nn.Linear(200, 5)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        x = self.dw(torch.relu(self.conv(x)))
        tokens = x.flatten(2).transpose(1, 2)[:, :4]  # (B, 4 tokens, 8)
        a, _ = self.attn(tokens, tokens, tokens)
        return self.fc(x.flatten(1)) + a.sum()


def test_quantizable_layers_params_and_macs():
    model = anybit.convert(_Tiny(), keep_first_last=8)
    model.train()
    anybit.set_precision(model, (4, 8))
    info = {i.name: i for i in anybit.quantizable_layers(model, torch.randn(3, 3, 10, 10))}
    assert list(info) == ["conv", "dw", "fc", "attn"]
    # conv: weight 8*3*3*3 = 216; MACs = 8*10*10 outputs * 3*3*3 = 800 * 27 = 21600
    assert (info["conv"].params, info["conv"].macs) == (216, 21600)
    # grouped: weight 8*(8/4)*3*3 = 144; MACs = 8*5*5 outputs * 2*3*3 = 200 * 18 = 3600
    assert (info["dw"].params, info["dw"].macs) == (144, 3600)
    # linear: 200*5 = 1000 params, 1000 MACs
    assert (info["fc"].params, info["fc"].macs) == (1000, 1000)
    # MHA (E=8, 4 tokens): in_proj 3*8*8 + out_proj 8*8 = 256 params;
    # MACs = q and out proj 2*4*8*8 = 512 + k,v proj 4*8*(8+8) = 512 -> 1024
    assert (info["attn"].params, info["attn"].macs) == (256, 1024)
    assert info["conv"].kind == "QuantConv2d" and info["attn"].kind == "QuantMultiheadAttention"
    assert info["conv"].pinned == (8, 8) and (info["conv"].w_bits, info["conv"].a_bits) == (8, 8)
    assert (info["dw"].w_bits, info["dw"].a_bits) == (4, 8)
    # the call restores precision and training mode, and without an input MACs are None
    assert model.training and model.dw.w_bits == 4
    assert all(i.macs is None for i in anybit.quantizable_layers(model))
    assert info["fc"].to_dict()["params"] == 1000
    with pytest.raises(NotConvertedError):
        anybit.quantizable_layers(_Tiny())


def test_calibrate_activations_sets_every_range_from_float_inputs():
    model = _resnet()
    model.eval()
    x = torch.randn(8, 3, 32, 32)
    with anybit.precision(model, 4), pytest.raises(anybit.quant.RangeNotCalibratedError):
        model(x)
    assert anybit.calibrate_activations(model, [(x, None)]) == len(quant_layers(model))
    first = quant_layers(model)["conv1"].input_quant
    assert first.lo.item() == pytest.approx(x.min().item()) and first.hi.item() == pytest.approx(x.max().item())
    with anybit.precision(model, 4):
        assert torch.isfinite(model(x)).all()
