"""Quantizer grids and STE gradients against hand-computed values; per-channel vs per-tensor;
weight bias correction statistics and gradients."""

from __future__ import annotations

import pytest
import torch

from anybit.quant import ActQuantizer, RangeNotCalibratedError, WeightQuantizer, round_ste, weight_bias_correction
from anybit.quant.functional import (
    asymmetric_weight,
    binary_weight,
    dorefa_weight,
    fake_quant,
    symmetric_weight,
)

ATOL = 1e-6
QUANTIZERS = {"symmetric": symmetric_weight, "asymmetric": asymmetric_weight, "dorefa": dorefa_weight}


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def close(a, b, atol=ATOL):
    return torch.allclose(a, b, atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------
# round_ste / fake_quant


def test_round_ste_forward_and_identity_gradient():
    x = t(0.4, 1.6, -2.3, 2.5, -0.6).requires_grad_()
    y = round_ste(x)
    # round-half-to-even: 2.5 -> 2
    assert torch.equal(y, t(0.0, 2.0, -2.0, 2.0, -1.0))
    (y * t(1, 2, 3, 4, 5)).sum().backward()
    assert torch.equal(x.grad, t(1, 2, 3, 4, 5))


def test_fake_quant_values_and_lsq_gradients():
    # scale 0.5, zp 2, grid [0, 7]: x/s = [-1.4, 0.52, 2, 10] -> round [-1, 1, 2, 10] -> +2 = [1, 3, 4, 12]
    # clamp [1, 3, 4, 7] -> -2 = [-1, 1, 2, 5] -> *0.5 = [-0.5, 0.5, 1.0, 2.5]
    x = t(-0.7, 0.26, 1.0, 5.0).requires_grad_()
    s = torch.tensor(0.5, requires_grad=True)
    zp = torch.tensor(2.0, requires_grad=True)
    y = fake_quant(x, s, zp, 0, 7)
    assert close(y, t(-0.5, 0.5, 1.0, 2.5))
    y.sum().backward()
    # x: identity inside the range, 0 where clamped
    assert torch.equal(x.grad, t(1, 1, 1, 0))
    # d/ds in range = round(x/s) - x/s = 0.4, 0.48, 0; clipped: (qmax - zp) = 5  -> 5.88
    assert s.grad.item() == pytest.approx(5.88, abs=1e-5)
    # d/dzp: 0 in range (+1 - 1); clipped: -s = -0.5
    assert zp.grad.item() == pytest.approx(-0.5, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# weight quantizers: literal grids

# symmetric, per-tensor: w = [-1, -0.4, 0, 0.3, 0.6, 1], amax = 1, scale = 1/qmax
W_SYM = (-1.0, -0.4, 0.0, 0.3, 0.6, 1.0)
SYM_EXPECTED = {
    # 1 bit: sign * mean|w|; mean|w| = 3.3/6 = 0.55; 0 -> +
    1: [-0.55, -0.55, 0.55, 0.55, 0.55, 0.55],
    # qmax 1: round(w) = [-1, -0, 0, 0, 1, 1]
    2: [-1.0, 0.0, 0.0, 0.0, 1.0, 1.0],
    # qmax 3: 3w = [-3, -1.2, 0, 0.9, 1.8, 3] -> [-3, -1, 0, 1, 2, 3] / 3
    3: [-1.0, -1 / 3, 0.0, 1 / 3, 2 / 3, 1.0],
    # qmax 7: 7w = [-7, -2.8, 0, 2.1, 4.2, 7] -> [-7, -3, 0, 2, 4, 7] / 7
    4: [-1.0, -3 / 7, 0.0, 2 / 7, 4 / 7, 1.0],
    # qmax 127: 127w = [-127, -50.8, 0, 38.1, 76.2, 127] -> [-127, -51, 0, 38, 76, 127] / 127
    8: [-1.0, -51 / 127, 0.0, 38 / 127, 76 / 127, 1.0],
}

# asymmetric, per-tensor: w = [-0.3, -0.1, 0.2, 0.4, 0.6], lo = -0.3, hi = 0.6, range 0.9
W_ASYM = (-0.3, -0.1, 0.2, 0.4, 0.6)
ASYM_EXPECTED = {
    # 1 bit: mean|w| = 1.6/5 = 0.32
    1: [-0.32, -0.32, 0.32, 0.32, 0.32],
    # scale 0.3, zp 1: w/s = [-1, -.33, .67, 1.33, 2] -> [-1, 0, 1, 1, 2] * 0.3
    2: [-0.3, 0.0, 0.3, 0.3, 0.6],
    # scale 0.9/7, zp round(2.33) = 2: w/s = [-2.33, -0.78, 1.56, 3.11, 4.67] -> [-2, -1, 2, 3, 5] (+2 in [0, 7])
    3: [-2 * 0.9 / 7, -0.9 / 7, 2 * 0.9 / 7, 3 * 0.9 / 7, 5 * 0.9 / 7],
    # scale 0.06, zp 5: w/s = [-5, -1.67, 3.33, 6.67, 10] -> [-5, -2, 3, 7, 10] * 0.06
    4: [-0.3, -0.12, 0.18, 0.42, 0.6],
    # scale 0.9/255, zp 85: w/s = [-85, -28.33, 56.67, 113.33, 170] -> [-85, -28, 57, 113, 170]
    8: [-85 * 0.9 / 255, -28 * 0.9 / 255, 57 * 0.9 / 255, 113 * 0.9 / 255, 170 * 0.9 / 255],
}

# dorefa, per-tensor: w = [-1, -0.25, 0.1, 0.5, 2]; mean|w| = 3.85/5 = 0.77
# tanh = [-0.761594, -0.244919, 0.099668, 0.462117, 0.964028], max = 0.964028
# n = tanh/max/2 + 1/2 = [0.104994, 0.372971, 0.551694, 0.739680, 1]
# out = (2 * round(n * L) / L - 1) * 0.77
W_DOREFA = (-1.0, -0.25, 0.1, 0.5, 2.0)
DOREFA_EXPECTED = {
    1: [-0.77, -0.77, 0.77, 0.77, 0.77],
    # L=3: n*3 = [0.315, 1.119, 1.655, 2.219, 3] -> [0, 1, 2, 2, 3] -> 2q/3-1 = [-1, -1/3, 1/3, 1/3, 1]
    2: [-0.77, -0.77 / 3, 0.77 / 3, 0.77 / 3, 0.77],
    # L=7: n*7 = [0.735, 2.611, 3.862, 5.178, 7] -> [1, 3, 4, 5, 7] -> [-5/7, -1/7, 1/7, 3/7, 1] * 0.77
    3: [-0.55, -0.11, 0.11, 0.33, 0.77],
    # L=15: n*15 = [1.575, 5.595, 8.275, 11.095, 15] -> [2, 6, 8, 11, 15] -> [-11, -3, 1, 7, 15]/15 * 0.77
    4: [-11 / 15 * 0.77, -3 / 15 * 0.77, 1 / 15 * 0.77, 7 / 15 * 0.77, 0.77],
    # L=255: n*255 = [26.77, 95.11, 140.68, 188.62, 255] -> [27, 95, 141, 189, 255]
    #        -> (2q - 255)/255 = [-201, -65, 27, 123, 255]/255 * 0.77
    8: [-201 / 255 * 0.77, -65 / 255 * 0.77, 27 / 255 * 0.77, 123 / 255 * 0.77, 0.77],
}


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_symmetric_grid(bits):
    assert close(symmetric_weight(t(*W_SYM), bits, per_channel=False), t(*SYM_EXPECTED[bits]))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_asymmetric_grid(bits):
    assert close(asymmetric_weight(t(*W_ASYM), bits, per_channel=False), t(*ASYM_EXPECTED[bits]))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_dorefa_grid(bits):
    assert close(dorefa_weight(t(*W_DOREFA), bits, per_channel=False), t(*DOREFA_EXPECTED[bits]), atol=1e-5)


@pytest.mark.parametrize("method", ["symmetric", "asymmetric", "dorefa"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_weight_quantizer_module_matches_function(method, bits):
    w = {"symmetric": W_SYM, "asymmetric": W_ASYM, "dorefa": W_DOREFA}[method]
    expected = {"symmetric": SYM_EXPECTED, "asymmetric": ASYM_EXPECTED, "dorefa": DOREFA_EXPECTED}[method][bits]
    assert close(WeightQuantizer(method, per_channel=False)(t(*w), bits), t(*expected), atol=1e-5)


def test_binary_per_channel_two_values_zero_is_positive():
    # channel 0: mean|w| = (1 + 3)/2 = 2 ; channel 1: mean|w| = (0 + 0.5)/2 = 0.25, sign(0) -> +
    w = torch.tensor([[1.0, -3.0], [0.0, -0.5]])
    assert torch.equal(binary_weight(w, per_channel=True), torch.tensor([[2.0, -2.0], [0.25, -0.25]]))
    # per tensor: mean|w| = 4.5/4 = 1.125
    assert torch.equal(binary_weight(w, per_channel=False), torch.tensor([[1.125, -1.125], [1.125, -1.125]]))
    big = torch.randn(64, generator=torch.Generator().manual_seed(0))
    big[3] = 0.0
    q = binary_weight(big, per_channel=False)
    assert len(torch.unique(q)) == 2
    assert q[3] > 0


@pytest.mark.parametrize("fn", [symmetric_weight, asymmetric_weight, dorefa_weight])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_levels_at_most_2_pow_bits(fn, per_channel, bits):
    w = torch.randn(4, 300, generator=torch.Generator().manual_seed(bits))
    q = fn(w, bits, per_channel=per_channel)
    rows = q if per_channel else q.reshape(1, -1)
    for row in rows:
        n = len(torch.unique(row))
        assert 2 <= n <= 2**bits
    if bits >= 4:  # a randn tensor of 300 values uses more than half the grid
        assert len(torch.unique(rows[0])) > 2 ** (bits - 1) // 2


@pytest.mark.parametrize("fn", [symmetric_weight, asymmetric_weight, dorefa_weight])
def test_32_bits_returns_same_tensor(fn):
    w = torch.randn(3, 4)
    assert fn(w, 32) is w
    assert WeightQuantizer()(w, 32) is w
    aq = ActQuantizer("learned")
    aq.eval()  # even uncalibrated: 32 bits never needs a range
    assert aq(w, 32) is w


# ----------------------------------------------------------------------------------------------
# STE gradients


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_symmetric_asymmetric_binary_ste_is_identity(bits):
    g = t(1, 2, 3, 4, 5, 6)
    for fn, w in ((symmetric_weight, W_SYM), (asymmetric_weight, (*W_ASYM, 0.0))):
        x = t(*w).requires_grad_()
        (fn(x, bits, per_channel=False) * g).sum().backward()
        assert torch.equal(x.grad, g), (fn.__name__, bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dorefa_gradient(bits):
    # out = tanh(w)/max|tanh| * mean|w| through the STE (max and mean detached)
    # d/dw = (1 - tanh(w)^2) / 0.964028 * 0.77
    x = t(*W_DOREFA).requires_grad_()
    dorefa_weight(x, bits, per_channel=False).sum().backward()
    assert close(x.grad, t(0.335447, 0.750820, 0.790798, 0.628161, 0.056431), atol=2e-5)


def test_dorefa_one_bit_gradient_identity():
    x = t(*W_DOREFA).requires_grad_()
    dorefa_weight(x, 1).sum().backward()
    assert torch.equal(x.grad, torch.ones(5))


# ----------------------------------------------------------------------------------------------
# per-channel vs per-tensor


@pytest.mark.parametrize("method", ["symmetric", "asymmetric", "dorefa"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_beats_per_tensor_on_uneven_channels(method, bits):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 2, 3, 3, generator=g) * torch.tensor([0.01, 0.1, 1.0, 10.0]).view(4, 1, 1, 1)
    fn = QUANTIZERS[method]
    qc, qt = fn(w, bits, per_channel=True), fn(w, bits, per_channel=False)
    err_c = ((qc - w) ** 2).sum(dim=(1, 2, 3))
    err_t = ((qt - w) ** 2).sum(dim=(1, 2, 3))
    assert err_c.sum() <= err_t.sum()
    # the small channels are crushed per tensor and kept per channel
    assert err_c[0] < err_t[0] and err_c[1] < err_t[1]
    # per-channel scales differ: the smallest nonzero step of each channel
    steps = []
    for c in range(4):
        levels = torch.unique(qc[c])
        steps.append((levels[1:] - levels[:-1]).min().item())
    assert len({round(s, 8) for s in steps}) == 4
    assert steps[0] < steps[1] < steps[2] < steps[3]


def test_weight_quantizer_set_range_overrides_per_bit():
    wq = WeightQuantizer("symmetric", per_channel=True)
    w = torch.tensor([[0.3, -0.8], [0.05, 0.2]])
    # calibrated 4-bit grid per channel: scales 0.1 and 0.05, zp 0, integers in [-8, 7]
    wq.set_range(4, torch.tensor([0.1, 0.05]), torch.tensor([0.0, 0.0]))
    # ch0: [3, -8] * 0.1 ; ch1: [1, 4] * 0.05
    assert close(wq(w, 4), torch.tensor([[0.3, -0.8], [0.05, 0.2]]))
    w2 = torch.tensor([[1.0, -1.0], [0.14, 0.6]])
    # ch0: 10 -> clamp 7, -10 -> clamp -8; ch1: 2.8 -> 3, 12 -> 7
    assert close(wq(w2, 4), torch.tensor([[0.7, -0.8], [0.15, 0.35]]))
    # other bit-widths still derive the grid from the weight
    assert torch.equal(wq(w2, 3), symmetric_weight(w2, 3, per_channel=True))
    assert wq.calibrated_bits() == [4]
    wq.clear_ranges(4)
    assert wq.calibrated_bits() == []


# ----------------------------------------------------------------------------------------------
# activation quantizer

X_ACT = (-0.6, 0.12, 0.2, 0.45, 0.93, 1.7)
# fixed range (0, 1), scale 1/L, zp 0, clamp to [0, L]
ACT_FIXED_EXPECTED = {
    1: [0, 0, 0, 0, 1, 1],                       # x = [-0.6, .12, .2, .45, .93, 1.7] -> round -> clamp [0, 1]
    2: [0, 0, 1 / 3, 1 / 3, 1, 1],               # 3x = [.36, .6, 1.35, 2.79] -> [0, 1, 1, 3]
    3: [0, 1 / 7, 1 / 7, 3 / 7, 1, 1],           # 7x = [.84, 1.4, 3.15, 6.51] -> [1, 1, 3, 7]
    4: [0, 2 / 15, 3 / 15, 7 / 15, 14 / 15, 1],  # 15x = [1.8, 3, 6.75, 13.95] -> [2, 3, 7, 14]
    8: [0, 31 / 255, 51 / 255, 115 / 255, 237 / 255, 1],  # 255x = [30.6, 51, 114.75, 237.15]
}


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_act_fixed_range_grid_and_gradient(bits):
    aq = ActQuantizer("fixed", (0.0, 1.0))
    aq.eval()  # a fixed range needs no calibration
    x = t(*X_ACT).requires_grad_()
    y = aq(x, bits)
    assert close(y, t(*ACT_FIXED_EXPECTED[bits]))
    y.sum().backward()
    assert torch.equal(x.grad, t(0, 1, 1, 1, 1, 0))  # clipped inputs get no gradient
    assert aq.lo.grad is None and aq.hi.grad is None and not aq.lo.requires_grad


def test_act_learned_initialises_on_first_training_batch_and_learns():
    aq = ActQuantizer("learned")
    assert not bool(aq.initialized)
    aq.train()
    # lo = -1, hi = 2, 2 bits: scale 1, zp 1 -> round(x) = [-1, 0, 1, 2]
    x = t(-1.0, 0.0, 0.7, 2.0).requires_grad_()
    y = aq(x, 2)
    assert bool(aq.initialized)
    assert aq.lo.item() == -1.0 and aq.hi.item() == 2.0
    assert close(y, t(-1.0, 0.0, 1.0, 2.0))
    (y * t(1, 2, 3, 4)).sum().backward()
    assert aq.hi.grad is not None and aq.hi.grad.abs().item() > 0
    assert aq.lo.grad is not None and aq.lo.grad.abs().item() > 0
    # later batches do not re-initialise
    aq(t(-5.0, 5.0), 2)
    assert aq.lo.item() == -1.0 and aq.hi.item() == 2.0
    # eval now works, clipping to the learnt range
    aq.eval()
    assert close(aq(t(-3.0, 3.0), 2), t(-1.0, 2.0))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_act_learned_levels(bits):
    aq = ActQuantizer("learned")
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    y = aq(x, bits)
    assert 2 <= len(torch.unique(y)) <= 2**bits


def test_act_eval_before_calibration_raises():
    aq = ActQuantizer("learned")
    aq.eval()
    with pytest.raises(RangeNotCalibratedError, match="not calibrated"):
        aq(torch.randn(4), 4)
    assert not bool(aq.initialized)


def test_act_per_bit_set_range_overrides():
    aq = ActQuantizer("learned")
    aq.eval()
    aq.set_range(4, torch.tensor(0.0), torch.tensor(1.5))  # only 4 bits is calibrated
    # scale 0.1, zp 0: x/s = [-3, 2.3, 7.6, 30] -> [-3, 2, 8, 30] clamp [0, 15] -> [0, .2, .8, 1.5]
    x = t(-0.3, 0.23, 0.76, 3.0).requires_grad_()
    y = aq(x, 4)
    assert close(y, t(0.0, 0.2, 0.8, 1.5))
    with pytest.raises(RangeNotCalibratedError):
        aq(x, 2)
    assert aq.calibrated_bits() == [4]
    y.sum().backward()
    rng = aq.range_for(4)
    assert rng[1].grad is not None and rng[1].grad.abs().item() > 0  # learnable per-bit range
    # the shared range is untouched and still serves other bits once initialised
    aq.init_range(-1.0, 2.0)
    assert close(aq(t(-1.0, 0.0, 0.7, 2.0), 2), t(-1.0, 0.0, 1.0, 2.0))
    assert close(aq(x, 4), t(0.0, 0.2, 0.8, 1.5))
    aq.set_range(2, torch.tensor(0.0), torch.tensor(3.0), learnable=False)
    # scale 1, zp 0: [-1, 0, 0.7, 2] -> [0, 0, 1, 2]
    assert close(aq(t(-1.0, 0.0, 0.7, 2.0), 2), t(0.0, 0.0, 1.0, 2.0))


def test_act_quantizer_rejects_bad_settings():
    with pytest.raises(ValueError):
        ActQuantizer("minmax")
    with pytest.raises(ValueError):
        ActQuantizer("fixed", (1.0, 1.0))
    with pytest.raises(ValueError):
        WeightQuantizer("nf4")


# ----------------------------------------------------------------------------------------------
# weight bias correction


def _uneven_weight(seed=0, spread=True):
    g = torch.Generator().manual_seed(seed)
    if spread:
        scales = torch.tensor([0.02, 0.3, 1.0, 3.0, 0.5, 0.07]).view(6, 1, 1, 1)
        shifts = torch.tensor([0.0, 0.1, -0.4, 1.0, 0.0, 0.05]).view(6, 1, 1, 1)
    else:  # per-tensor grids: comparable channels, so that few channels collapse to one level
        scales = torch.tensor([0.8, 1.0, 1.2, 0.9, 1.1, 1.0]).view(6, 1, 1, 1)
        shifts = torch.tensor([0.0, 0.1, -0.2, 0.3, 0.0, 0.05]).view(6, 1, 1, 1)
    return torch.randn(6, 4, 3, 3, generator=g) * scales + shifts


def _check_stats(w, corrected, q):
    flat_w, flat_c, flat_q = (v.reshape(v.shape[0], -1) for v in (w, corrected, q))
    checked = 0
    for c in range(w.shape[0]):
        if flat_q[c].std(unbiased=False) == 0:  # constant quantized channel: only the mean is kept
            assert torch.allclose(flat_c[c], flat_w[c].mean().expand_as(flat_c[c]), atol=1e-6)
            continue
        checked += 1
        assert abs(flat_c[c].mean() - flat_w[c].mean()) < 1e-5
        assert abs(flat_c[c].std(unbiased=False) - flat_w[c].std(unbiased=False)) < 1e-5
    return checked


@pytest.mark.parametrize("method", ["dorefa", "symmetric", "asymmetric"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_wbc_matches_channel_mean_and_std_for_every_bits(method, per_channel):
    w = _uneven_weight(spread=per_channel)
    for bits in range(1, 9):
        q = QUANTIZERS[method](w, bits, per_channel=per_channel)
        corrected = weight_bias_correction(w, q)
        # not vacuous: from 3 bits on no channel is constant
        assert _check_stats(w, corrected, q) >= (6 if bits >= 3 else 3), (method, bits)
        # and the correction actually changed something where stats were off
        assert not torch.allclose(corrected, q)


def test_wbc_constant_channel_becomes_channel_mean():
    w = torch.tensor([[0.1, 0.2, 0.3], [1.0, -1.0, 3.0]])
    q = torch.tensor([[0.5, 0.5, 0.5], [1.0, -1.0, 1.0]])
    out = weight_bias_correction(w, q)
    assert torch.allclose(out[0], torch.full((3,), 0.2))
    # ch1: mean_w = 1, std_w = sqrt(8/3); q: mean 1/3, std sqrt(8/9) -> gain sqrt(3)
    # out = (q - 1/3) * sqrt(3) + 1 = [1 + 2/sqrt(3), 1 - 4/sqrt(3), 1 + 2/sqrt(3)]
    s3 = 3**0.5
    assert torch.allclose(out[1], torch.tensor([1 + 2 / s3, 1 - 4 / s3, 1 + 2 / s3]), atol=1e-6)


def test_wbc_gradients_detach_true_and_false():
    w0 = _uneven_weight(3)
    # detach=True: statistics are constants, so d sum(out)/dw = gain_c = std(w_c)/std(q_c) (STE: dq/dw = 1)
    w = w0.clone().requires_grad_()
    q = symmetric_weight(w, 4, per_channel=True)
    weight_bias_correction(w, q, detach=True).sum().backward()
    fw, fq = w0.reshape(6, -1), q.detach().reshape(6, -1)  # dq/dw = 1 incl. the max |w|
    gain = fw.std(dim=1, unbiased=False) / fq.std(dim=1, unbiased=False)
    assert torch.allclose(w.grad, gain.view(6, 1, 1, 1).expand_as(w0), rtol=1e-5)
    # detach=False: sum(out) = n * mean(w_c) exactly, so the gradient is 1 everywhere
    w = w0.clone().requires_grad_()
    q = symmetric_weight(w, 4, per_channel=True)
    weight_bias_correction(w, q, detach=False).sum().backward()
    assert torch.allclose(w.grad, torch.ones_like(w0), atol=1e-5)
    # a non-trivial loss gives different gradients with and without detach
    grads = []
    for detach in (True, False):
        w = w0.clone().requires_grad_()
        out = weight_bias_correction(w, dorefa_weight(w, 3), detach=detach)
        (out**2).sum().backward()
        assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
        grads.append(w.grad)
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("scale, zero_point", [(0.05, 3.0), (0.3, 0.0), (0.01, 7.4)])
def test_cpu_fake_quant_functions_equal_pytorch_kernels(bits, scale, zero_point):
    from anybit.quant.functional import fake_quant_fixed_grid, fake_quant_learned_grid

    torch.manual_seed(bits)
    x = (torch.randn(6, 4, 5, 5) * 1.5).requires_grad_()
    g = torch.randn_like(x)
    qmax = 2**bits - 1

    def grads(fn, learn: bool):
        s = torch.tensor([scale], requires_grad=learn)
        z = torch.tensor([zero_point], requires_grad=learn)
        out = fn(x, s, z)
        out.backward(g)
        result = (out.detach(), x.grad.clone(), s.grad, z.grad)
        x.grad = None
        return result

    ours = grads(lambda v, s, z: fake_quant_learned_grid(v, s, z, bits, 0.37), True)
    ref = grads(lambda v, s, z: torch._fake_quantize_learnable_per_tensor_affine(v, s, z, 0, qmax, 0.37), True)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert torch.allclose(ours[2], ref[2], rtol=1e-4, atol=1e-5) and torch.allclose(ours[3], ref[3], rtol=1e-4,
                                                                                        atol=1e-6)
    zp = torch.tensor(float(min(max(round(zero_point), 0), qmax)))
    ours = grads(lambda v, s, z: fake_quant_fixed_grid(v, s, zp, bits), False)
    ref = grads(lambda v, s, z: torch.fake_quantize_per_tensor_affine(v, s, zp.reshape(1).int(), 0, qmax), False)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


def test_cpu_clamp_equals_torch_clamp_with_number_bounds():
    from anybit.quant.functional import clamp_fixed

    x = torch.tensor([-1.0, 0.0, 0.25, 1.0, 2.0], requires_grad=True)
    clamp_fixed(x, torch.tensor(0.0), torch.tensor(1.0)).backward(torch.ones(5))
    ref = x.detach().clone().requires_grad_()
    ref.clamp(0.0, 1.0).backward(torch.ones(5))
    assert torch.equal(x.grad, ref.grad) and x.grad.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
