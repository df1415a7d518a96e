"""anybit.ptq: calibration data, range initialisation, graph analysis, AdaQuant, BN and bias tuning,
pipelines through the Python API. Tiny models and synthetic data; one intra-op thread (conftest)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anybit
from anybit import ptq
from anybit.ptq import layerwise

torch.manual_seed(0)


class Net(nn.Module):
    """conv-bn-relu, conv-bn (+ residual add, so no ReLU after the BN), relu, pool, linear."""

    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.foo = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        a = self.foo(self.bn1(self.conv1(x)))
        b = self.bn2(self.conv2(a)) + a
        c = F.relu(self.conv3(F.relu(b)))
        return self.fc(c.mean(dim=(2, 3)))


class BranchyNet(Net):
    """Same layers, but data-dependent control flow, so torch.fx cannot trace it."""

    def forward(self, x):
        a = self.foo(self.bn1(self.conv1(x)))
        if float(a.mean()) > -1e9:  # always true, but fx cannot know
            b = self.bn2(self.conv2(a)) + a
        c = torch.relu(self.conv3(F.relu(b)))
        return self.fc(c.mean(dim=(2, 3)))


def _trained(net: nn.Module, x: torch.Tensor, steps: int = 15) -> nn.Module:
    """A few SGD steps on random labels, so BatchNorm statistics and weights are not at their init."""
    y = torch.randint(0, 5, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:  # accurate running statistics, as a well-trained model has
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        for chunk in x.split(100):
            net(chunk)
    for bn in bns:
        bn.momentum = 0.1
    return net.eval()


@pytest.fixture(scope="module")
def calib():
    return torch.randn(300, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def net(calib):
    torch.manual_seed(0)
    return _trained(Net(), calib)


# ----------------------------------------------------------------- calibration data

def test_calibration_tensor_accepts_tensors_datasets_and_loaders(calib):
    labels = torch.zeros(300, dtype=torch.long)
    pairs = torch.utils.data.TensorDataset(calib, labels)
    assert torch.equal(ptq.calibration_tensor(calib), calib)
    assert torch.equal(ptq.calibration_tensor(pairs), calib)
    assert torch.equal(ptq.calibration_tensor(torch.utils.data.DataLoader(pairs, batch_size=64)), calib)
    assert torch.equal(ptq.calibration_tensor([calib[:100], calib[100:]]), calib)
    sub = ptq.calibration_tensor(pairs, num_samples=50, seed=3)
    assert sub.shape == (50, 3, 8, 8) and torch.equal(sub, ptq.calibration_tensor(calib, 50, seed=3))
    data = anybit.data.load("synthetic", "train", num_samples=40, image_size=8)
    assert ptq.calibration_tensor(data, num_samples=10).shape == (10, 3, 8, 8)


def test_calibration_data_errors(calib):
    with pytest.raises(ptq.CalibrationDataError, match="has only 300"):
        ptq.calibration_tensor(calib, num_samples=301)
    with pytest.raises(ptq.CalibrationDataError, match="has only 300"):
        ptq.calibration_tensor(torch.utils.data.DataLoader(calib, batch_size=100), num_samples=400)
    with pytest.raises(ptq.CalibrationDataError, match="empty"):
        ptq.calibration_tensor(torch.empty(0, 3))
    with pytest.raises(ptq.CalibrationDataError, match="not an input tensor"):
        ptq.calibration_tensor([["a", "b"]])


# ----------------------------------------------------------------- ranges

def test_mse_weight_grid_beats_minmax_and_ranges_are_per_bit(net, calib):
    w = net.conv2.weight
    for bits in (3, 4):
        errs = {}
        for method in ("minmax", "mse"):
            scale, zp, _ = ptq.weight_grid(w, bits, method)
            q = (torch.clamp(torch.round(w / scale.view(-1, 1, 1, 1)) + zp.view(-1, 1, 1, 1), 0, 2**bits - 1)
                 - zp.view(-1, 1, 1, 1)) * scale.view(-1, 1, 1, 1)
            errs[method] = float((q - w).detach().pow(2).mean())
        assert errs["mse"] < errs["minmax"]
    model = ptq.ptq_convert(net, keep_first_last=None)
    anybit.set_precision(model, 4)
    result = ptq.init_ranges(model, calib, "mse")
    layer = model.conv2
    assert layer.weight_quant.calibrated_bits() == [4] and layer.input_quant.calibrated_bits() == [4]
    lo, hi = result["conv2"]["act_range"]
    with torch.no_grad():
        top = float(F.relu(net.bn1(net.conv1(calib))).max())
    assert lo == 0.0 and 0 < hi <= top + 1e-6  # input of conv2 is post-ReLU
    with anybit.precision(model, 8), pytest.raises(anybit.quant.RangeNotCalibratedError):
        model(calib[:2])  # 8-bit ranges were never calibrated: they are not silently shared


# ----------------------------------------------------------------- graph

EXPECTED_POST = {"conv1": ("bn1", True), "conv2": ("bn2", False), "conv3": (None, True), "fc": (None, False)}


@pytest.mark.parametrize("cls, method", [(Net, "fx"), (BranchyNet, "hooks")])
def test_relu_detection_from_the_graph_not_names(cls, method, calib):
    model = ptq.ptq_convert(cls().eval(), keep_first_last=None)
    graph = ptq.analyse(model, calib[:2])
    assert graph.method == method
    assert graph.order == ["conv1", "conv2", "conv3", "fc"]
    assert {n: (p.bn, p.relu) for n, p in graph.post.items()} == EXPECTED_POST
    assert graph.in_numel["conv2"] == 8 * 8 * 8 and graph.out_numel["fc"] == 5


def test_hook_fallback_agrees_with_fx_on_resnet(calib):
    model = ptq.ptq_convert(anybit.models.create("resnet20", width=0.25).eval())
    x = torch.randn(2, 3, 8, 8)
    fx_graph, hook_graph = ptq.analyse(model, x), ptq.analyse(model, x, use_fx=False)
    assert fx_graph.method == "fx" and hook_graph.method == "hooks"
    assert fx_graph.post == hook_graph.post
    assert fx_graph.post["layer1.0.conv1"] == ptq.PostOp("layer1.0.bn1", True)
    assert fx_graph.post["layer1.0.conv2"] == ptq.PostOp("layer1.0.bn2", False)  # residual add before the ReLU


# ----------------------------------------------------------------- AdaQuant

def _quantized(net, calib, method="minmax", bits=3):
    model = ptq.ptq_convert(net, keep_first_last=None)
    anybit.set_precision(model, bits)
    ptq.init_ranges(model, calib, method)
    return model


def test_adaquant_lowers_every_layer_output_mse_below_round_to_nearest(net, calib):
    model = _quantized(net, calib, "minmax")
    graph = ptq.analyse(model, calib[:2])
    rtn = layerwise.layer_errors(model, net, calib, graph)
    report = ptq.adaquant(model, calib, mode="parallel", iters=60, float_model=net)
    after = layerwise.layer_errors(model, net, calib, graph)
    assert set(report["layers"]) == set(rtn) == {"conv1", "conv2", "conv3", "fc"}
    for name, entry in report["layers"].items():
        assert entry["mse_before"] == pytest.approx(rtn[name], rel=1e-4)
        assert after[name] < rtn[name], name
        assert not entry["reverted"]
    assert report["layers"]["conv1"]["post_op"] == "bn1 + relu"


def test_adaquant_converts_a_float_model_in_place_and_keeps_the_reference(net, calib):
    model = copy.deepcopy(net)
    report = ptq.adaquant(model, calib, 4, 4, mode="parallel", iters=5, keep_first_last=8)
    assert anybit.get_precision(model) == {"conv1": (8, 8), "conv2": (4, 4), "conv3": (4, 4), "fc": (8, 8)}
    assert report["mode"] == "parallel" and report["graph"] == "fx"


@pytest.mark.parametrize("caching", ["graph", "passes"])
def test_sequential_mode_caches_quantized_inputs_for_the_whole_calibration_set(net, calib, monkeypatch, caching):
    """Layer conv2's cached inputs must be the outputs of the already quantized conv1 path for all
    300 samples (more than one forward batch), not only for the first batch."""
    monkeypatch.setattr(layerwise, "FORWARD_BATCH", 64)
    model = _quantized(net, calib, "mse")
    recorded = {}
    original = layerwise._optimise

    def spy(problem, x, y, *args, **kwargs):
        if problem.name == "conv2":
            expected = []
            handle = model.conv2.register_forward_pre_hook(lambda mod, a: expected.append(a[0].clone()))
            with torch.no_grad():
                for chunk in calib.split(37):  # independent batching, whole model, no early stop
                    model(chunk)
                fp = F.relu(net.bn1(net.conv1(calib)))
            handle.remove()
            recorded.update(x=x.clone(), y=y.clone(), expected=torch.cat(expected), float=fp,
                            target=net.bn2(net.conv2(fp)).detach())
        return original(problem, x, y, *args, **kwargs)

    monkeypatch.setattr(layerwise, "_optimise", spy)
    report = ptq.adaquant(model, calib, mode="sequential", iters=5, float_model=net, caching=caching)
    assert report["caching"] == caching
    x, expected, fp = recorded["x"], recorded["expected"], recorded["float"]
    assert x.shape[0] == calib.shape[0] == expected.shape[0]
    assert torch.allclose(x, expected, atol=1e-5)
    per_sample = (x - fp).flatten(1).abs().amax(1)
    assert bool((per_sample[64:] > 1e-4).all())  # quantized inputs beyond the first batch too
    assert torch.allclose(recorded["y"], recorded["target"], atol=1e-5)  # targets: float layer on float inputs, + BN
    assert report["layers"]["conv2"]["input"] == "quantized"


def test_graph_and_pass_caching_give_the_same_result(net, calib):
    results = []
    for caching in ("graph", "passes"):
        model = _quantized(net, calib, "mse")
        report = ptq.adaquant(model, calib, mode="sequential", iters=5, float_model=net, caching=caching, seed=1)
        results.append((model, report))
    (m1, r1), (m2, r2) = results
    for name in r1["layers"]:
        assert r1["layers"][name]["mse_before"] == pytest.approx(r2["layers"][name]["mse_before"], rel=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_adaquant_cache_limit_fails_before_any_work(net, calib):
    model = _quantized(net, calib)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ptq.CacheTooLargeError, match="smaller calibration set"):
        ptq.adaquant(model, calib, iters=5, float_model=net, max_cache_bytes=100_000)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_adaquant_settings_are_validated(net, calib):
    with pytest.raises(ptq.PTQError, match="mode="):
        ptq.adaquant(copy.deepcopy(net), calib, mode="diagonal")
    with pytest.raises(ptq.PTQError, match="iters="):
        ptq.adaquant(copy.deepcopy(net), calib, iters=-1)
    with pytest.raises(anybit.BitsError):
        ptq.adaquant(copy.deepcopy(net), calib, w_bits=0)


# ----------------------------------------------------------------- BN and bias tuning

def test_bn_tuning_recovers_perturbed_statistics(net, calib):
    model = ptq.ptq_convert(net, keep_first_last=None)  # at 32 bits: the float model
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for bn in bns.values():  # exact statistics of the calibration set: one full-batch pass
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        model(calib)
    truth = {n: (bn.running_mean.clone(), bn.running_var.clone()) for n, bn in bns.items()}
    for bn in bns.values():
        bn.eval()
        bn.momentum = 0.3
        bn.running_mean.add_(torch.randn_like(bn.running_mean))
        bn.running_var.mul_(5.0)
    result = ptq.bn_tuning(model, calib, batch_size=100)
    assert result["batchnorms"] == 2 and result["mean_abs_shift"] > 0.3 and "kl_before" not in result
    assert torch.allclose(model.bn1.running_mean, truth["bn1"][0], atol=1e-5)  # mean of equal batches' means
    for name, bn in bns.items():
        mean, var = truth[name]
        assert torch.allclose(bn.running_mean, mean, atol=0.02), name
        assert torch.allclose(bn.running_var, var, rtol=0.1), name
        assert bn.momentum == 0.3 and not bn.training


def test_bias_tuning_lowers_kl_and_touches_only_biases(net, calib):
    model = _quantized(net, calib, "minmax", bits=3)
    weights = {n: p.clone() for n, p in model.named_parameters() if n.endswith("weight") and "bn" not in n}
    result = ptq.bias_tuning(model, net, calib, iters=40, batch_size=50)
    assert result["kl_after"] < result["kl_before"] and not result["reverted"]
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters() if n in weights)
    targets = ptq.float_logits(net, calib)
    assert ptq.logits_kl(model, targets, calib) == pytest.approx(result["kl_after"], rel=1e-5)


# ----------------------------------------------------------------- pipelines (Python API)

def test_quantize_pipeline_reports_and_leaves_the_input_alone(net, calib):
    reference = copy.deepcopy(net)
    seen = []
    qmodel, report = ptq.quantize(net, calib, 4, 4, "advanced", iters=10, bias_iters=10, adaquant_mode="parallel",
                                  on_stage_end=lambda name, m: seen.append(name))
    assert seen == report.pipeline == ["ranges_mse", "allocate_bits", "adaquant", "bn_tuning", "bias_tuning"]
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), net.state_dict().values()))
    assert not any(isinstance(m, anybit.quant.QuantConv2d) for m in net.modules())
    assert report.precision == {"conv1": [8, 8], "conv2": [4, 4], "conv3": [4, 4], "fc": [8, 8]}
    assert report.kl["final"] < report.kl["init"]
    assert report.layers["conv2"]["mse_calibrated"] <= report.layers["conv2"]["mse_init"]
    assert set(report.stage_seconds()) == set(seen) and report.calibration_seconds > 0
    assert report.to_dict()["config"]["w_bits"] == 4


def test_quantized_model_survives_save_and_load(net, calib, tmp_path):
    model = anybit.models.create("resnet20", width=0.25, num_classes=5)
    _trained(model, calib, steps=3)
    qmodel, _ = ptq.quantize(model, calib[:64], 3, 4, "mse", measure=False)
    anybit.save(qmodel, tmp_path / "q")
    loaded = anybit.load(tmp_path / "q").eval()
    x = calib[:8]
    with torch.no_grad():
        assert torch.allclose(loaded(x), qmodel(x), atol=1e-5)
    assert anybit.get_precision(loaded)["layer1.0.conv1"] == (3, 4)


def test_quantize_a_converted_multibit_model_uses_it_at_32_bits(net, calib):
    converted = anybit.convert(copy.deepcopy(net), weight="dorefa", wbc=True, keep_first_last=8)
    anybit.set_precision(converted, 2)
    qmodel, report = ptq.quantize(converted, calib[:64], 8, 8, "rtn")
    float_ref = ptq.float_copy(converted)
    with torch.no_grad():
        assert torch.allclose(float_ref(calib[:4]), net(calib[:4]), atol=1e-6)
        assert (qmodel(calib[:4]) - net(calib[:4])).abs().max() < 0.1  # W8A8 stays close to float
    assert qmodel.conv2.weight_quant.method == "asymmetric" and not qmodel.conv2.wbc


def test_bit_allocator_stage_sets_precision_and_calibrates_new_bits(net, calib):
    def allocator(model, float_model, data):
        assert data.shape == (64, 3, 8, 8)
        return {"conv2": (8, 8)}

    qmodel, report = ptq.quantize(net, calib[:64], 4, 4, "light", bit_allocator=allocator)
    assert anybit.get_precision(qmodel)["conv2"] == (8, 8)
    assert 8 in qmodel.conv2.weight_quant.calibrated_bits()
    assert report.stages[1]["result"]["changed"] == ["conv2"]


def test_quantize_rejects_bad_inputs_before_work(net, calib):
    with pytest.raises(ptq.PTQError, match="no layer anybit can quantize"):
        ptq.quantize(nn.Sequential(nn.ReLU()), calib)
    with pytest.raises(anybit.BitsError, match="w_bits=17"):
        ptq.quantize(net, calib, w_bits=17)
    with pytest.raises(ptq.PTQError, match="pipeline="):
        ptq.quantize(net, calib, pipeline="fancy")
    with pytest.raises(ptq.CalibrationDataError, match="has only 300"):
        ptq.quantize(net, calib, num_samples=1000)
    with pytest.raises(ptq.PTQError, match="must start with a range stage"):
        ptq.quantize(net, calib, pipeline=["adaquant"])


def test_emqnet_model_with_clipped_float_inputs_is_refused():
    """emqnet clips layer inputs at 32 bits too; plain float layers cannot, so PTQ refuses clearly."""
    from anybit.train.methods import METHODS

    model = anybit.convert(anybit.models.create("resnet20", width=0.25), METHODS["emqnet"].quant_spec((2, 4, 32), 32))
    with pytest.raises(ptq.PTQError, match="clips the inputs"):
        ptq.float_copy(model)
    dedicated = anybit.convert(anybit.models.create("resnet20", width=0.25), METHODS["dedicated"].quant_spec((2, 4, 32), 32))
    assert not any(isinstance(m, anybit.quant.QuantConv2d) for m in ptq.float_copy(dedicated).modules())
