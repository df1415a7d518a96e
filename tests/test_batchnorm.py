"""Per-precision BatchNorm statistics: which set is used at trained, untrained and per-layer precisions,
how the statistics passes fill them, and checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anybit
from anybit.quant import PrecisionBatchNorm2d, QuantSpec, SpecError, quantization_step
from anybit.train import reestimate_bn, shared_bn_recalibrated

BITS = (1, 2, 4, 8, 32)


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def spec(**kw) -> QuantSpec:
    base = dict(weight="dorefa", act="fixed", act_clip_float=True, wbc=True, bn_stats="per-precision",
                bn_bits=BITS, keep_first_last=32)
    return QuantSpec(**{**base, **kw})


@pytest.fixture()
def model():
    torch.manual_seed(0)
    m = anybit.convert(net(), spec())
    images = torch.randn(16, 1, 8, 8)
    m.train()
    for b in BITS:                      # one training-mode batch per precision: every set differs
        anybit.set_precision(m, b)
        m(images * (1 + b / 8))
    return m.eval()


def bns(m):
    return [x for x in m.modules() if isinstance(x, PrecisionBatchNorm2d)]


def inputs_of(module, m, x):
    seen = []
    handle = module.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    m(x)
    handle.remove()
    return seen[-1]


def test_conversion_keeps_one_set_of_affine_terms_and_statistics_per_trained_precision():
    float_model = net()
    bn_params = sum(p.numel() for x in float_model.modules() if isinstance(x, nn.BatchNorm2d) for p in x.parameters())
    m = anybit.convert(float_model, spec())
    assert len(bns(m)) == 3 and anybit.conversion_report(m)["precision_bn"] == ["1", "4", "7"]
    assert sum(p.numel() for x in bns(m) for p in x.parameters()) == bn_params   # no parameter added
    assert bns(m)[0].trained_keys() == ["1", "2", "4", "8", "32"]
    assert bns(m)[0].running_mean is None   # the plain BatchNorm's single set is gone, not stale
    with pytest.raises(SpecError, match="bn_bits"):
        QuantSpec(bn_stats="per-precision")
    with pytest.raises(SpecError, match="switchable"):
        QuantSpec(bn="switchable", bn_stats="per-precision", bn_bits=(2, 4))
    with pytest.raises(SpecError, match="bn_untrained"):
        spec(bn_untrained="average")


def test_training_at_a_precision_moves_only_that_precision_s_statistics(model):
    bn = bns(model)[1]                                  # behind an unpinned (quantized) conv
    before = {k: bn.statistics(int(k))[0].clone() for k in bn.trained_keys()}
    model.train()
    anybit.set_precision(model, 4)
    model(torch.randn(16, 1, 8, 8))
    after = {k: bn.statistics(int(k))[0] for k in bn.trained_keys()}
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["4"]


def test_eval_uses_the_trained_precision_s_own_statistics(model):
    x = torch.randn(4, 1, 8, 8)
    bn = bns(model)[1]
    for b in BITS:
        anybit.set_precision(model, b)
        pre = inputs_of(bn, model, x)
        out = []
        handle = bn.register_forward_hook(lambda mod, inp, o: out.append(o))
        model(x)
        handle.remove()
        mean, var = bn._buffers[f"running_mean_{b}"], bn._buffers[f"running_var_{b}"]
        assert torch.allclose(out[0], F.batch_norm(pre, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps))


def test_the_bn_behind_the_pinned_float_first_layer_uses_the_32_bit_set_at_every_precision(model):
    first = bns(model)[0]
    x = torch.randn(4, 1, 8, 8)
    for b in (1, 3, 32):
        anybit.set_precision(model, b)
        model(x)
        assert first.input_precision() == (32, 32)


def test_untrained_precisions_derive_statistics_by_the_rule_without_data(model):
    bn = bns(model)[1]
    s = {b: bn.statistics(b) for b in BITS}
    # interpolate: linear in the grid step 1/(2^b - 1) between the trained neighbours
    t = (quantization_step(3) - quantization_step(4)) / (quantization_step(2) - quantization_step(4))
    mean, var = bn.statistics(3)
    assert torch.allclose(mean, t * s[2][0] + (1 - t) * s[4][0]) and torch.allclose(var, t * s[2][1] + (1 - t) * s[4][1])
    t16 = (quantization_step(16) - 0.0) / (quantization_step(8) - 0.0)
    assert torch.allclose(bn.statistics(16)[0], t16 * s[8][0] + (1 - t16) * s[32][0])
    bn.untrained_rule = "nearest"
    assert torch.equal(bn.statistics(3)[0], s[4][0]) and torch.equal(bn.statistics(6)[0], s[8][0])
    bn.untrained_rule = "shared"
    assert torch.allclose(bn.statistics(5)[0], sum(s[b][0] for b in BITS) / 5)
    # weights decide: an untrained (w, a) pair uses its weight bit-width's set
    assert torch.equal(bn.statistics(4, 8)[0], s[4][0])


def test_a_per_layer_bit_map_gives_each_bn_its_feeding_layer_s_precision(model):
    x = torch.randn(4, 1, 8, 8)
    names = list(anybit.get_precision(model))           # "0", "3", "6", "11"
    anybit.set_precision(model, {names[1]: 2, names[2]: 8})
    seen = {}
    handles = [bn.register_forward_pre_hook(lambda mod, inp, i=i: seen.__setitem__(i, mod.input_precision()))
               for i, bn in enumerate(bns(model))]
    model(x)
    for h in handles:
        h.remove()
    assert seen == {0: (32, 32), 1: (2, 2), 2: (8, 8)}
    # and equals the uniform run where the map is uniform
    anybit.set_precision(model, 4)
    uniform = model(x)
    anybit.set_precision(model, {n: 4 for n in names[1:3]})
    assert torch.equal(model(x), uniform)


def test_checkpoints_round_trip_every_set_including_ones_added_after_conversion(model, tmp_path):
    model.train()
    anybit.set_precision(model, 3)                      # training at 3 bits gives it its own set
    model(torch.randn(16, 1, 8, 8))
    model.eval()
    assert "3" in bns(model)[1].trained_keys()
    anybit.save(model, tmp_path / "m")
    loaded = anybit.load(tmp_path / "m", model=net()).eval()
    x = torch.randn(4, 1, 8, 8)
    for b in (1, 3, 5, 32):
        anybit.set_precision(model, b)
        anybit.set_precision(loaded, b)
        assert torch.equal(model(x), loaded(x))


def test_an_old_single_set_checkpoint_still_loads_and_evaluates(tmp_path):
    torch.manual_seed(0)
    old = anybit.convert(net(), spec(bn_stats="shared", bn_bits=()))
    old.train()
    old(torch.randn(16, 1, 8, 8))
    old.eval()
    anybit.save(old, tmp_path / "old")
    sidecar = anybit.read_metadata(tmp_path / "old")
    for key in ("bn_stats", "bn_untrained"):            # as written before these settings existed
        del sidecar["model"]["quant_spec"][key]
    (tmp_path / "old.json").write_text(__import__("json").dumps(sidecar))
    loaded = anybit.load(tmp_path / "old", model=net()).eval()
    assert not bns(loaded) and isinstance(loaded[1], nn.BatchNorm2d)
    x = torch.randn(4, 1, 8, 8)
    for b in (1, 3, 32):
        anybit.set_precision(old, b)
        anybit.set_precision(loaded, b)
        assert torch.equal(old(x), loaded(x))


def test_the_statistics_pass_fills_each_precision_s_set_exactly_and_leaves_unvisited_sets(model):
    bn = bns(model)[1]
    batches = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    seen = {}
    handle = bn.register_forward_hook(lambda mod, inp, out: seen.setdefault(mod.input_precision(), []).append(inp[0]))
    untouched = bn.statistics(8)[0].clone()
    reestimate_bn(model, [(x, None) for x in batches], [4, 1], batches=2)
    handle.remove()
    for b in (4, 1):
        inputs = seen[(b, b)]
        assert torch.allclose(bn.statistics(b)[0], torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0),
                              atol=1e-6)
        assert torch.allclose(bn.statistics(b)[1], torch.stack([x.var(dim=(0, 2, 3)) for x in inputs]).mean(0),
                              rtol=1e-4)
    assert torch.equal(bn.statistics(8)[0], untouched)   # 8 bits did not run: its set stays


def test_recalibrating_an_untrained_precision_is_undone_afterwards(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with shared_bn_recalibrated(model, [(torch.randn(16, 1, 8, 8), None)], 3, batches=1):
        assert "3" in bns(model)[1].trained_keys()
    assert "3" not in bns(model)[1].trained_keys()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_deep_copy_has_its_own_precision_trace(model):
    twin = copy.deepcopy(model)
    anybit.set_precision(model, 1)
    anybit.set_precision(twin, 8)
    seen = []
    for m in (twin, model):
        bns(m)[1].register_forward_pre_hook(lambda mod, inp: seen.append(mod.input_precision()))
        m(torch.randn(2, 1, 8, 8))
    assert seen == [(8, 8), (1, 1)]
    assert bns(twin)[1].precision_trace is list(anybit.quant.quant_layers(twin).values())[1].precision_trace
    assert bns(twin)[1].precision_trace is not bns(model)[1].precision_trace
