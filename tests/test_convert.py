"""anybit.convert on torchvision, Hugging Face and the project's own models: exact outputs at
32 bits, the conversion report, skip lists, pinned first/last layers, and error cases."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

import anybit
from anybit.models import create
from anybit.quant import (
    ActQuantizer,
    NothingToQuantizeError,
    QuantConv2d,
    QuantLinear,
    QuantMultiheadAttention,
    quant_layers,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _convert_quiet(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anybit.convert(model, **kw)


def _calibrate_bn(model, *args, **kwargs):
    """Give BatchNorms real statistics (a randomly initialised net in eval mode outputs ~0)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        model(*args, **kwargs)
    model.eval()


def _outputs(model, *args, **kwargs):
    with torch.no_grad():
        out = model(*args, **kwargs)
    return getattr(out, "logits", out)


def _low_precision_outputs(model, *args, bits=4, **kwargs):
    """Outputs at ``bits`` with the activation quantizers in training mode (this first batch
    initialises their learned ranges) and everything else in eval mode (BatchNorm untouched)."""
    model.eval()
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.train()
    with anybit.precision(model, bits):
        out = _outputs(model, *args, **kwargs)
    model.eval()
    return out


def _roundtrip(model, convert_kwargs=None, *args, **kwargs):
    """Convert ``model``; exact outputs at 32 bits; 4 bits differs; exact again after the context."""
    _calibrate_bn(model, *args, **kwargs)
    ref = _outputs(model, *args, **kwargs)
    assert ref.abs().max() > 1e-3
    out_model = _convert_quiet(model, **(convert_kwargs or {}))
    assert out_model is model
    model.eval()
    assert torch.equal(_outputs(model, *args, **kwargs), ref)
    low = _low_precision_outputs(model, *args, **kwargs)
    assert low.shape == ref.shape and (low - ref).abs().max() > 1e-3 * ref.abs().max()
    assert torch.equal(_outputs(model, *args, **kwargs), ref)
    return anybit.conversion_report(model)


def test_resnet18_torchvision():
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    report = _roundtrip(model, None, x)
    # 1 stem + 4 stages x 2 blocks x 2 convs + 3 downsample convs + fc = 1 + 16 + 3 + 1
    assert len(report["converted"]) == 21
    assert report["converted"][0] == "conv1" and report["converted"][-1] == "fc"
    assert "layer2.0.downsample.0" in report["converted"]
    assert report["unsupported"] == [] and report["skipped"] == [] and report["pinned"] == ["conv1", "fc"]
    assert isinstance(model.conv1, QuantConv2d) and isinstance(model.fc, QuantLinear)


def test_mobilenet_v2_depthwise():
    model = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5)
    x = torch.randn(2, 3, 32, 32)
    report = _roundtrip(model, None, x)
    # stem + 17 inverted residual blocks (first: 2 convs, others 3) + final 1x1 conv + classifier
    assert len(report["converted"]) == 1 + 2 + 16 * 3 + 1 + 1
    dw = model.features[1].conv[0][0]
    assert isinstance(dw, QuantConv2d) and dw.groups == dw.in_channels


def test_small_vision_transformer_mha():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head
    x = torch.randn(2, 3, 32, 32)
    report = _roundtrip(model, None, x)
    # conv_proj + 2 x (self_attention + 2 MLP linears) + head; out_proj is part of the MHA
    assert len(report["converted"]) == 8
    assert "encoder.layers.encoder_layer_0.self_attention" in report["converted"]
    assert not any("out_proj" in n for n in report["converted"] + [u["name"] for u in report["unsupported"]])
    assert isinstance(model.encoder.layers[0].self_attention, QuantMultiheadAttention)


def test_vit_b_16_conversion_on_meta():
    with torch.device("meta"):
        model = torchvision.models.vit_b_16()
    anybit.convert(model)
    report = anybit.conversion_report(model)
    assert len(report["converted"]) == 1 + 12 * 3 + 1
    assert report["unsupported"] == []
    assert sum(isinstance(m, QuantMultiheadAttention) for m in model.modules()) == 12


BERT_KW = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)


def test_bert_from_config():
    transformers = pytest.importorskip("transformers")
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**BERT_KW))
    ids = torch.randint(0, 100, (2, 7))
    with pytest.warns(UserWarning, match="Embedding"):
        anybit.convert(copy.deepcopy(model))
    report = _roundtrip(model, None, input_ids=ids)
    # per layer: q, k, v, attention output, intermediate, output = 6; x2 + pooler + classifier
    assert len(report["converted"]) == 14
    assert sorted(u["name"] for u in report["unsupported"]) == [
        "bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings",
        "bert.embeddings.word_embeddings"]
    assert {u["type"] for u in report["unsupported"]} == {"Embedding"}


def test_gpt2_conv1d_left_float_and_reported():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16,
                                  pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2ForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 100, (2, 6))
    ref = _outputs(model, input_ids=ids)
    with pytest.warns(UserWarning, match="Conv1D"):
        anybit.convert(model)
    report = anybit.conversion_report(model)
    assert report["converted"] == ["score"]
    conv1d = [u["name"] for u in report["unsupported"] if u["type"] == "Conv1D"]
    assert len(conv1d) == 8 and "transformer.h.0.attn.c_attn" in conv1d
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert torch.equal(_outputs(model, input_ids=ids), ref)
    # only Conv1D and embeddings: nothing to quantize
    with pytest.raises(NothingToQuantizeError, match="Conv1D|c_attn"):
        anybit.convert(transformers.GPT2Model(cfg))


def test_project_resnet20_report_and_pinning():
    model = create("resnet20", width=0.5)
    x = torch.randn(2, 3, 16, 16)
    report = _roundtrip(model, {"keep_first_last": 8}, x)
    # stem + 9 blocks x 2 + 2 shortcut convs + fc
    assert len(report["converted"]) == 22
    assert report["pinned"] == ["conv1", "fc"]
    assert model.conv1.pinned == (8, 8) and model.fc.pinned == (8, 8) and model.layer1[0].conv1.pinned is None
    anybit.set_precision(model, 4)
    prec = anybit.get_precision(model)
    assert prec["conv1"] == (8, 8) and prec["fc"] == (8, 8)
    assert all(p == (4, 4) for n, p in prec.items() if n not in ("conv1", "fc"))
    anybit.set_precision(model, (2, 6))
    assert anybit.get_precision(model)["fc"] == (8, 8) and anybit.get_precision(model)["layer3.2.conv2"] == (2, 6)
    anybit.set_precision(model, 32)
    assert set(anybit.get_precision(model).values()) == {(32, 32)}
    anybit.set_precision(model, w=32, a=4)  # 32 on one side makes that side float even when pinned
    assert anybit.get_precision(model)["conv1"] == (32, 8)
    # an explicit per-layer map may move a pinned layer
    anybit.set_precision(model, {"conv1": 2})
    assert anybit.get_precision(model)["conv1"] == (2, 2)
    assert model.anybit_meta["arch"] == "resnet20"  # the registry's entry survives conversion
    assert model.anybit_meta["quant_spec"]["keep_first_last"] == 8


def test_skip_list_with_globs():
    model = create("resnet20", width=0.25)
    ref_type = type(model.layer1[0].conv1)
    _convert_quiet(model, skip=("layer1.*", "*.shortcut.0", "fc"))
    report = anybit.conversion_report(model)
    skipped = report["skipped"]
    assert len(skipped) == 6 + 2 + 1
    assert "layer1.2.conv2" in skipped and "layer2.0.shortcut.0" in skipped and "fc" in skipped
    assert type(model.layer1[0].conv1) is ref_type is nn.Conv2d
    assert type(model.layer2[0].shortcut[0]) is nn.Conv2d and type(model.fc) is nn.Linear
    assert not set(skipped) & set(report["converted"])
    assert len(report["converted"]) == 22 - 9
    assert report["unsupported"] == []  # skipped layers are not "unsupported"
    assert set(quant_layers(model)) == set(report["converted"])


def test_subclass_with_own_forward_left_float():
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(4, 4), Scaled(4, 2), nn.Embedding(3, 4))
    with pytest.warns(UserWarning, match="Scaled"):
        anybit.convert(model)
    report = anybit.conversion_report(model)
    assert report["converted"] == ["0"]
    assert report["unsupported"] == [{"name": "1", "type": "Scaled"}, {"name": "2", "type": "Embedding"}]
    assert type(model[1]) is Scaled


def test_nothing_to_quantize_and_double_convert():
    with pytest.raises(NothingToQuantizeError):
        anybit.convert(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(NothingToQuantizeError, match="left in float"):
        _convert_quiet(nn.Sequential(nn.Conv1d(2, 2, 3)))
    with pytest.raises(NothingToQuantizeError):  # everything skipped
        anybit.convert(nn.Sequential(nn.Linear(2, 2)), skip=("*",))
    assert issubclass(NothingToQuantizeError, ValueError)
    model = anybit.convert(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="already converted"):
        anybit.convert(model)
    with pytest.raises(TypeError):
        anybit.convert("resnet20")


def test_spec_settings_reach_the_layers():
    model = create("resnet20", width=0.25)
    anybit.convert(model, weight="symmetric", act="fixed", act_range=(-1, 2), wbc=True, wbc_detach=False)
    layer = model.layer1[0].conv1
    assert layer.weight_quant.method == "symmetric" and layer.weight_quant.per_channel is True
    assert layer.input_quant.mode == "fixed" and (layer.input_quant.lo.item(), layer.input_quant.hi.item()) == (-1, 2)
    assert layer.wbc and not layer.wbc_detach
    spec = anybit.QuantSpec.from_dict(model.anybit_meta["quant_spec"])
    assert spec.act_range == (-1.0, 2.0) and spec.wbc
    with pytest.raises(ValueError):
        anybit.convert(create("resnet20", width=0.25), weight="int4")
    with pytest.raises(ValueError):
        anybit.convert(create("resnet20", width=0.25), bn="switchable")  # needs bn_bits
