"""Quantizable layers: bit-identical at 32 bits, quantized and trainable below, independent
weight/activation bits, parameter sharing, the weight bias correction switch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anybit.quant import (
    ActQuantizer,
    QuantConv2d,
    QuantLinear,
    QuantMultiheadAttention,
    WeightQuantizer,
    weight_bias_correction,
)
from anybit.quant.functional import dorefa_weight, symmetric_weight


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


CONVS = {
    "plain": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    "strided_bias_dilated": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, dilation=2, padding=2,
                                 bias=True),
    "grouped": dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1),
    "depthwise": dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, padding=1, bias=False),
    "reflect": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
}


@pytest.mark.parametrize("kind", sorted(CONVS))
def test_conv_32_bits_bit_identical_and_4_bits_differs(kind):
    conv = nn.Conv2d(**CONVS[kind])
    ref = copy.deepcopy(conv)
    q = QuantConv2d.from_float(conv)
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(q(x), ref(x))
    q.set_bits(4, 4)
    q.train()
    y = q(x)
    assert y.shape == ref(x).shape and not torch.allclose(y, ref(x))
    y.square().sum().backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    assert q.input_quant.hi.grad is not None
    q.set_bits(32, 32)
    q.eval()
    assert torch.equal(q(x), ref(x))


def test_from_float_shares_parameter_objects_and_mode():
    conv = nn.Conv2d(3, 5, 3, bias=True).eval()
    q = QuantConv2d.from_float(conv)
    assert q.weight is conv.weight and q.bias is conv.bias
    assert not q.training
    lin = nn.Linear(4, 3)
    ql = QuantLinear.from_float(lin)
    assert ql.weight is lin.weight and ql.bias is lin.bias
    # gradients of the quantized layer land on the float model's parameters (optimizers keep working)
    q.set_bits(4, 32)
    q.train()
    q(torch.randn(1, 3, 5, 5)).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0 and conv.bias.grad is not None
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=5)
    qm = QuantMultiheadAttention.from_float(mha)
    assert qm.q_proj_weight is mha.q_proj_weight and qm.v_proj_weight is mha.v_proj_weight
    assert qm.out_proj.weight is mha.out_proj.weight and qm.in_proj_bias is mha.in_proj_bias


@pytest.mark.parametrize("bias", [True, False])
def test_linear_32_bits_bit_identical_and_4_bits(bias):
    lin = nn.Linear(7, 5, bias=bias)
    ref = copy.deepcopy(lin)
    q = QuantLinear.from_float(lin)
    x = torch.randn(3, 2, 7)
    assert torch.equal(q(x), ref(x))
    q.set_bits(4, 4)
    y = q(x)
    assert not torch.allclose(y, ref(x))
    y.sum().backward()
    assert q.weight.grad.abs().sum() > 0


def test_w_bits_and_a_bits_are_independent():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    q = QuantConv2d.from_float(conv, weight_quant=WeightQuantizer("symmetric", True),
                               input_quant=ActQuantizer("fixed", (-2.0, 2.0)))
    x = torch.randn(2, 3, 6, 6)
    wq4 = symmetric_weight(conv.weight, 4, per_channel=True)
    xq8 = q.input_quant(x, 8)
    assert not torch.equal(xq8, x) and not torch.equal(wq4, conv.weight)
    q.set_bits(4, 32)  # weights only: the input is untouched
    assert torch.equal(q(x), F.conv2d(x, wq4, conv.bias, padding=1))
    q.set_bits(4, 8)  # changing a_bits changes only the input path
    assert torch.equal(q(x), F.conv2d(xq8, wq4, conv.bias, padding=1))
    q.set_bits(32, 8)  # activations only: the float weight
    assert torch.equal(q(x), F.conv2d(xq8, conv.weight, conv.bias, padding=1))
    assert (q.w_bits, q.a_bits) == (32, 8) and not q.is_float


def test_linear_w_and_a_bits_independent():
    lin = nn.Linear(6, 3)
    q = QuantLinear.from_float(lin, input_quant=ActQuantizer("fixed", (-1.0, 1.0)))
    x = torch.randn(4, 6)
    q.set_bits(32, 2)
    assert torch.equal(q(x), F.linear(q.input_quant(x, 2), lin.weight, lin.bias))
    q.set_bits(3, 32)
    assert torch.equal(q(x), F.linear(x, dorefa_weight(lin.weight, 3), lin.bias))


@pytest.mark.parametrize("wbc_detach", [True, False])
@pytest.mark.parametrize("method,per_channel", [("dorefa", False), ("symmetric", True), ("asymmetric", False)])
def test_wbc_switch_on_module(method, per_channel, wbc_detach):
    conv = nn.Conv2d(4, 6, 3, padding=1)
    q = QuantConv2d.from_float(conv, weight_quant=WeightQuantizer(method, per_channel),
                               input_quant=ActQuantizer("fixed", (-3.0, 3.0)), wbc=True, wbc_detach=wbc_detach)
    w = conv.weight.detach().reshape(6, -1)
    for bits in range(1, 9):
        q.set_bits(bits, 32)
        wq = q.quantize_weight(q.weight).detach()
        plain = q.weight_quant(q.weight, bits).detach().reshape(6, -1)
        flat = wq.reshape(6, -1)
        for c in range(6):
            if plain[c].std(unbiased=False) > 0:
                assert abs(flat[c].mean() - w[c].mean()) < 1e-5
                assert abs(flat[c].std(unbiased=False) - w[c].std(unbiased=False)) < 1e-5
        # the layer really computes with the corrected weight
        x = torch.randn(1, 4, 5, 5)
        assert torch.allclose(q(x), F.conv2d(x, wq, conv.bias, padding=1), atol=1e-6)
    q.set_bits(2, 32)
    q.zero_grad()
    q(torch.randn(2, 4, 5, 5)).square().sum().backward()
    assert q.weight.grad is not None and torch.isfinite(q.weight.grad).all() and q.weight.grad.abs().sum() > 0
    # at 32 bits the correction is off: bit-identical to the float layer
    q.set_bits(32, 32)
    x = torch.randn(1, 4, 5, 5)
    assert torch.equal(q(x), conv(x))


def test_wbc_off_vs_on_differ():
    conv = nn.Conv2d(3, 4, 3)
    a = QuantConv2d.from_float(conv, wbc=False)
    b = QuantConv2d.from_float(conv, wbc=True)
    for m in (a, b):
        m.set_bits(2, 32)
    assert not torch.allclose(a.quantize_weight(conv.weight), b.quantize_weight(conv.weight))
    assert torch.allclose(b.quantize_weight(conv.weight),
                          weight_bias_correction(conv.weight, dorefa_weight(conv.weight, 2)))


MHA_CASES = {
    "seq_first": dict(embed_dim=8, num_heads=2),
    "batch_first": dict(embed_dim=8, num_heads=2, batch_first=True),
    "kdim_vdim": dict(embed_dim=8, num_heads=2, kdim=6, vdim=5),
    "kdim_vdim_batch_first_bias_kv": dict(embed_dim=8, num_heads=2, kdim=6, vdim=5, batch_first=True,
                                          add_bias_kv=True),
}


def _mha_inputs(mha, self_attn):
    b, lq, lk = 2, 3, 4
    kdim, vdim = mha.kdim, mha.vdim

    def shape(n, d):
        return (b, n, d) if mha.batch_first else (n, b, d)

    q = torch.randn(*shape(lq, 8))
    if self_attn:
        return q, q, q
    return q, torch.randn(*shape(lk, kdim)), torch.randn(*shape(lk, vdim))


@pytest.mark.parametrize("case", sorted(MHA_CASES))
@pytest.mark.parametrize("train", [False, True])
def test_mha_32_bits_bit_identical(case, train):
    mha = nn.MultiheadAttention(**MHA_CASES[case]).train(train)
    ref = copy.deepcopy(mha)
    q = QuantMultiheadAttention.from_float(mha)
    self_attn = mha.kdim == 8 and mha.vdim == 8
    args = _mha_inputs(mha, self_attn)
    with torch.no_grad():
        out, weights = q(*args)
        ref_out, ref_weights = ref(*args)
    assert torch.equal(out, ref_out) and torch.equal(weights, ref_weights)
    if self_attn:  # cross-attention inputs too
        args = _mha_inputs(mha, False)
        assert torch.equal(q(*args)[0], ref(*args)[0])


@pytest.mark.parametrize("case", sorted(MHA_CASES))
def test_mha_4_bits_matches_float_mha_on_quantized_weights_and_inputs(case):
    mha = nn.MultiheadAttention(**MHA_CASES[case])
    q = QuantMultiheadAttention.from_float(copy.deepcopy(mha),
                                           input_quant=ActQuantizer("fixed", (-3.0, 3.0)))
    q.set_bits(4, 4)
    self_attn = mha.kdim == 8 and mha.vdim == 8
    query, key, value = _mha_inputs(mha, self_attn)
    out, _ = q(query, key, value)
    # reference: a float MHA whose projection weights are the 4-bit ones, fed 4-bit inputs
    ref = copy.deepcopy(mha)
    with torch.no_grad():
        for name, w in q.quantized_parameters().items():
            ref.get_parameter(name).copy_(w)
    assert set(q.quantized_parameters()) == (
        {"in_proj_weight", "out_proj.weight"} if mha._qkv_same_embed_dim
        else {"q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"})
    aq = q.input_quant
    ref_out, _ = ref(aq(query, 4), aq(key, 4), aq(value, 4))
    assert torch.allclose(out, ref_out, atol=1e-6)
    assert not torch.allclose(out, mha(query, key, value)[0], atol=1e-4)
    out.square().sum().backward()
    grads = [p.grad for n, p in q.named_parameters() if n.endswith("weight") and "quant" not in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    # a_bits only: weights stay float
    q.set_bits(32, 4)
    assert all(torch.equal(w, q.get_parameter(n)) for n, w in q.quantized_parameters().items())
