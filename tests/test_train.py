"""Multi-bit training through the Python API: methods, BatchNorm kinds, untrained bit-widths, resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import anybit
from anybit import data
from anybit.quant import SwitchableBatchNorm
from anybit.train import (
    Distillation,
    MultiBitTrainer,
    NoSwitchableBNError,
    ResumeError,
    TrainConfig,
    TrainConfigError,
    recalibrate_bn,
    reestimate_bn,
    shared_bn_recalibrated,
)
from anybit.train.optim import LRSchedule
from anybit.train.state import flatten, unflatten

BITS = (1, 2, 4, 32)


def small_net(in_channels: int = 1, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes),
    )


@pytest.fixture(scope="module")
def datasets():
    train = data.load("synthetic", "train", num_samples=256, channels=1, image_size=16)
    test = data.load("synthetic", "test", num_samples=128, channels=1, image_size=16)
    return train, test


@pytest.fixture(scope="module")
def trained(datasets):
    """Each method trained once for 3 short epochs (shared by several tests)."""
    train, test = datasets
    runs = {}
    for name in ("dedicated", "anyprecision", "emqnet", "emqnet-single-set"):
        torch.manual_seed(0)
        method, _, single = name.partition("-")
        config = TrainConfig(bits=BITS, method=method, epochs=3, batch_size=32, coreset_fraction=1.0
                             if method != "dedicated" else None, bn_stats="shared" if single else None)
        trainer = MultiBitTrainer(small_net(), train, test, config, quiet=True)
        runs[name] = (trainer, trainer.fit())
    return runs


@pytest.mark.parametrize("method", ["dedicated", "anyprecision", "emqnet"])
def test_every_method_trains_and_loss_falls_at_every_bit_width(trained, method):
    trainer, result = trained[method]
    first, last = result["history"][0]["bits"], result["history"][-1]["bits"]
    for b in BITS:
        assert last[str(b)]["ce"] < first[str(b)]["ce"] - 0.1, (method, b, first[str(b)], last[str(b)])
        assert result["samples"][b]["train"] == 3 * 256
    assert set(result["final"]) == set(BITS)
    assert all(0.0 <= m["accuracy"] <= 100.0 for m in result["final"].values())
    assert result["final"][32]["accuracy"] > 30.0


def test_shared_and_switchable_batchnorm_parameter_counts():
    def bn_params(model):
        return sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())

    float_bn = bn_params(small_net())
    config = dict(bits=BITS, epochs=1)
    ds = data.load("synthetic", "train", num_samples=8, channels=1, image_size=8)
    emq = MultiBitTrainer(small_net(), ds, config=TrainConfig(method="emqnet", **config))
    anyp = MultiBitTrainer(small_net(), ds, config=TrainConfig(method="anyprecision", **config))
    ded = MultiBitTrainer(small_net(), ds, config=TrainConfig(method="dedicated", **config))
    assert bn_params(emq.models) == float_bn
    assert bn_params(anyp.models) == len(BITS) * float_bn
    assert sum(isinstance(m, SwitchableBatchNorm) for m in anyp.models.modules()) == 3
    assert bn_params(ded.models) == len(BITS) * float_bn
    non_bn = sum(p.numel() for p in anybit.convert(small_net()).parameters()) - float_bn
    assert sum(p.numel() for p in emq.models.parameters()) == non_bn + float_bn
    assert sum(p.numel() for p in anyp.models.parameters()) == non_bn + len(BITS) * float_bn


def test_emqnet_runs_untrained_bit_widths_without_recalibration(trained):
    trainer, _ = trained["emqnet"]
    results = trainer.evaluate(bits=[3, 5, 6, 7])
    assert set(results) == {3, 5, 6, 7}
    assert all(r["accuracy"] > 0 for r in results.values())


def test_anyprecision_untrained_bit_width_needs_recalibration(trained, datasets):
    trainer, _ = trained["anyprecision"]
    model = trainer.model_for(3)
    with pytest.warns(UserWarning, match=r"not evaluated at \[3\] bits.*recalibrate-bn"):
        assert set(trainer.evaluate(bits=[3, 4])) == {4}    # the untrained one is left out, not the list
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    loader = data.make_loader(datasets[0], 32, shuffle=True, seed=0)
    info = recalibrate_bn(model, loader, 3, batches=2)
    assert info["recalibrated"] and info["source"] == 4 and info["batches"] == 2 and info["seconds"] > 0
    after = model.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)   # nothing trained changed
    assert any(k.endswith("bns.3.running_mean") for k in after)
    assert trainer.evaluate(bits=[3])[3]["accuracy"] > 0
    again = recalibrate_bn(model, loader, 3, batches=2)
    assert not again["recalibrated"]
    with pytest.raises(NoSwitchableBNError):
        recalibrate_bn(trained["emqnet"][0].model_for(3), loader, 3)


def test_shared_bn_recalibration_fits_one_bit_width_and_restores_the_checkpoint(trained, datasets):
    model = trained["emqnet-single-set"][0].model_for(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.cat([datasets[0][i][0][None] for i in range(256)])
    first_bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    seen = []
    first_bn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    with shared_bn_recalibrated(model, [(images, None)], 3, batches=1) as info:
        pre_bn = seen[-1]
        assert info["batches"] == 1 and info["samples"] == 256 and not model.training
        assert torch.allclose(first_bn.running_mean, pre_bn.mean(dim=(0, 2, 3)), atol=1e-5)
        assert torch.allclose(first_bn.running_var, pre_bn.var(dim=(0, 2, 3)), rtol=1e-3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # the checkpoint is unchanged
    with pytest.raises(ValueError, match="empty"), shared_bn_recalibrated(model, [], 3):
        pass
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_final_bn_pass_averages_every_bit_width_equally_and_keeps_the_weights(trained, datasets):
    import copy
    model = copy.deepcopy(trained["emqnet-single-set"][0].model_for(32))
    weights = {k: v.clone() for k, v in model.named_parameters()}
    mode = model.training
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][1]   # after a quantized layer
    batches = [torch.cat([datasets[0][i][0][None] for i in range(j, j + 32)]) for j in (0, 32)]
    seen = []
    hook = bn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    info = reestimate_bn(model, [(x, None) for x in batches], [32, 2], batches=2)
    hook.remove()
    assert info["bits"] == {32: {"batches": 2, "samples": 64}, 2: {"batches": 2, "samples": 64}}
    assert len(seen) == 4 and model.training == mode and bn.momentum == 0.1
    expected_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen]).mean(0)
    expected_var = torch.stack([x.var(dim=(0, 2, 3)) for x in seen]).mean(0)
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, expected_var, rtol=1e-3)
    assert not torch.allclose(seen[0].mean(dim=(0, 2, 3)), seen[2].mean(dim=(0, 2, 3)))  # the bits differ
    assert all(torch.equal(weights[k], v) for k, v in model.named_parameters())


def test_final_bn_pass_skips_a_model_without_batchnorm():
    model = anybit.convert(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
                           anybit.QuantSpec(keep_first_last=None))

    def no_batches():
        raise AssertionError("a model without BatchNorm needs no forward pass")
        yield

    info = reestimate_bn(model, no_batches(), [2, 32])
    assert info == {"bits": {2: {"batches": 0, "samples": 0}, 32: {"batches": 0, "samples": 0}}, "seconds": 0.0}


@pytest.mark.parametrize("batches", [0, 2])
def test_trainer_ends_with_the_bn_pass_and_accounts_for_it(datasets, batches):
    train, _ = datasets
    config = TrainConfig(bits=(2, 32), method="anyprecision", epochs=1, batch_size=32, final_bn_batches=batches)
    trainer = MultiBitTrainer(small_net(), train, None, config, quiet=True)
    result = trainer.fit()
    last = result["history"][-1]
    if batches:
        assert last["final_bn"] == {"32": {"batches": 2, "samples": 64}, "2": {"batches": 2, "samples": 64}}
        assert last["seconds"]["final_bn"] > 0 and result["timings_s"]["final_bn"] > 0
        assert result["samples"][2]["final_bn"] == 64
    else:
        assert "final_bn" not in last and "final_bn" not in result["timings_s"]
        assert result["samples"][2]["final_bn"] == 0


def test_distillation_teachers():
    assert Distillation("recursive", [1, 2, 4, 32]).teachers == {32: None, 4: 32, 2: 4, 1: 2}
    assert Distillation("from-top", [4, 1, 32]).teachers == {32: None, 4: 32, 1: 32}
    assert Distillation("none", [1, 32]).teachers == {32: None, 1: None}


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": ()}, "empty"),
    ({"bits": (4, 4)}, "repeats"),
    ({"bits": (0, 4)}, "not a valid bit-width"),
    ({"bits": (17,)}, "not a valid bit-width"),
    ({"method": "lsq"}, "method='lsq' is unknown"),
    ({"coreset_fraction": 0.0}, r"must be in \(0, 1\]"),
    ({"coreset_fraction": 1.5}, r"must be in \(0, 1\]"),
    ({"method": "dedicated", "distill": "recursive"}, "independently"),
    ({"coreset_score": "loss"}, "coreset_score"),
    ({"epochs": 0}, "epochs"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_config_method_defaults():
    emqnet = TrainConfig(method="emqnet").resolved()
    assert emqnet.coreset_fraction == 0.2 and emqnet.coreset_score == "random" and emqnet.distill == "none"
    assert emqnet.bn_stats == "per-precision" and emqnet.coreset_steps == "subset"
    with pytest.raises(TrainConfigError, match="applies to method 'emqnet'"):
        TrainConfig(method="anyprecision", bn_stats="shared")
    assert TrainConfig(method="anyprecision").resolved().distill == "recursive"
    assert TrainConfig(method="dedicated").resolved().distill == "none"
    assert TrainConfig(optimizer="adam").resolved().lr == 1e-3
    assert TrainConfig().resolved().keep_first_last == 32


def untimed(metrics: dict) -> dict:
    """Metrics without wall times (``*_s``, ``*_seconds``), which differ between runs."""
    return {b: {k: v for k, v in m.items() if not k.endswith(("_s", "_seconds"))} for b, m in metrics.items()}


def _interrupt_after(epochs: int):
    def hook(trainer, record):
        if record["epoch"] == epochs:
            raise KeyboardInterrupt
    return hook


def test_resume_reaches_the_same_weights_and_metrics(datasets, tmp_path):
    """emqnet with a 0.5 coreset (sampler state, per-bit subsets, the teachers' logit memory), Adam, step schedule."""
    train, test = datasets
    config = TrainConfig(bits=(1, 4, 32), method="emqnet", epochs=3, batch_size=32, coreset_fraction=0.5,
                         optimizer="adam", lr=3e-3, schedule="step", coreset_score="el2n", distill="recursive")

    def make(out, hook=None):
        torch.manual_seed(0)
        return MultiBitTrainer(small_net(), train, test, config, quiet=True, out_dir=out, on_epoch_end=hook)

    full = make(tmp_path / "full")
    expected = full.fit()
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "cut", _interrupt_after(1)).fit()
    resumed = make(tmp_path / "cut")
    result = resumed.fit(resume=True)

    assert untimed(result["final"]) == untimed(expected["final"])
    assert result["samples"] == expected["samples"]
    # fit time covers the epochs before the interruption too
    seconds = [sum(r["seconds"].values()) for r in result["history"]]
    assert result["timings_s"]["fit"] >= sum(seconds) > sum(seconds[1:])
    a, b = full.models.state_dict(), resumed.models.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The coreset was used: half the data per bit-width, subsets that differ, the teachers' memory restored.
    last = expected["history"][-1]
    assert last["bits"]["4"]["samples"] == 128
    for t in (32, 4):
        assert resumed.memory.known[t].any() and torch.equal(resumed.memory.known[t], full.memory.known[t])
        assert torch.equal(resumed.memory.logits[t], full.memory.logits[t])
    assert min(last["overlap"].values()) < 1.0
    assert [untimed(r["bits"]) for r in result["history"]] == [untimed(r["bits"]) for r in expected["history"]]
    assert len((tmp_path / "cut" / "log.csv").read_text().splitlines()) == 1 + 3 * 3

    other = MultiBitTrainer(small_net(), train, test, TrainConfig(**{**config.to_dict(), "lr": 0.01}),
                            quiet=True, out_dir=tmp_path / "cut")
    with pytest.raises(ResumeError, match="lr: saved 0.003, now 0.01"):
        other.fit(resume=True)


def test_converted_torchvision_resnet18_trains_on_32x32():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    train = data.load("synthetic", "train", num_samples=32, channels=3, image_size=32)
    trainer = MultiBitTrainer(model, train, train, TrainConfig(bits=(2, 32), method="emqnet", epochs=1,
                                                              batch_size=16, coreset_fraction=1.0), quiet=True)
    result = trainer.fit()
    assert set(result["final"]) == {2, 32}
    assert anybit.conversion_report(model)["pinned"] == ["conv1", "fc"]
    assert trainer.evaluate(bits=[3])[3]["samples"] == 32


def test_training_state_round_trip_without_pickle():
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "t": (1, 2.5, None), "ints": {4: torch.arange(3)}}
    tensors: dict = {}
    tree = flatten(state, tensors)
    import json

    back = unflatten(json.loads(json.dumps(tree)), tensors)
    assert back["t"] == (1, 2.5, None)
    assert torch.equal(back["ints"][4], torch.arange(3))
    assert torch.equal(back["optimizer"]["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])


def test_lr_schedules():
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0)
    cosine, step = LRSchedule(opt, "cosine", 4), LRSchedule(opt, "step", 4)
    assert cosine.factor(0) == 1.0 and cosine.factor(2) == pytest.approx(0.5) and cosine.factor(4) == pytest.approx(0)
    assert [step.factor(e) for e in (0, 1.9, 2, 3)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.01)]


def test_emqnet_float_path_clips_activations_and_survives_a_checkpoint(tmp_path):
    """emqnet's shared BatchNorm needs the same activation clip at 32 bits; pinned layers stay exactly float."""
    import torch.nn.functional as F

    from anybit.models import create
    from anybit.train import METHODS

    model = anybit.convert(small_net(), METHODS["emqnet"].quant_spec((1, 32), 32))
    anybit.set_precision(model, 32)
    x = torch.randn(2, 16, 4, 4) * 3
    inner, first = model[3], model[0]
    assert torch.allclose(inner(x), F.conv2d(x.clamp(0, 1), inner.weight, None, 2, 1))
    image = torch.randn(2, 1, 8, 8) * 3
    assert torch.equal(first(image), F.conv2d(image, first.weight, None, 1, 1))
    anyp = anybit.convert(small_net(), METHODS["anyprecision"].quant_spec((1, 32), 32))
    assert not anyp[3].input_quant.clip_float

    net = anybit.convert(create("resnet20", width=0.25), METHODS["emqnet"].quant_spec((1, 32), 32))
    anybit.save(net, tmp_path / "m")
    assert anybit.load(tmp_path / "m").layer1[0].conv1.input_quant.clip_float


def test_epoch_line_reports_test_accuracy_or_loss():
    from anybit.train.trainer import epoch_line

    record = {"epoch": 2, "seconds": {"scoring": 1.0, "train": 10.0, "eval": 2.0},
              "bits": {"32": {"loss": 0.5, "test_acc": 81.25}, "4": {"loss": 0.7, "test_acc": 79.0}}}
    assert epoch_line(record, 5) == "epoch 2/5 (13 s) test top-1: 32b 81.2%, 4b 79.0%"
    record = {"epoch": 1, "seconds": {"train": 3.0}, "bits": {"32": {"loss": 0.5}}}
    assert epoch_line(record, 5) == "epoch 1/5 (3 s) train: 32b loss 0.500"


class _TupleOutput(nn.Module):
    """Returns (logits, features), or {"logits": ..., "features": ...} with ``as_dict``."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.body, self.as_dict = small_net(), as_dict

    def forward(self, x):
        logits = self.body(x)
        return {"logits": logits, "features": x.mean()} if self.as_dict else (logits, x.mean())


@pytest.mark.parametrize("as_dict", [False, True])
def test_models_returning_a_tuple_or_dict_train_and_evaluate(datasets, as_dict):
    train, test = datasets
    torch.manual_seed(0)
    config = TrainConfig(bits=(2, 32), method="emqnet", epochs=1, batch_size=64, coreset_fraction=1.0)
    result = MultiBitTrainer(_TupleOutput(as_dict), train, test, config, quiet=True).fit()
    assert all(0 <= m["accuracy"] <= 100 for m in result["final"].values())


def test_per_epoch_evaluation_sees_fresh_statistics_and_leaves_the_training_alone(datasets):
    """Before a per-epoch evaluation the BatchNorm statistics are re-estimated (momentum averages of per-bit sets
    lag early in training); the line then reports what the model holds at that moment, and runs with and without
    evaluation train the same weights."""
    train, test = datasets
    config = TrainConfig(bits=(1, 32), method="emqnet", epochs=3, batch_size=32, coreset_fraction=0.5)
    seen = []

    def check(trainer, record):
        if record["epoch"] < 3:
            now = trainer.evaluate()
            seen.append(all(record["bits"][str(b)]["test_acc"] == now[b]["accuracy"] for b in now))

    torch.manual_seed(0)
    evaluated = MultiBitTrainer(small_net(), train, test, config, quiet=True, on_epoch_end=check)
    evaluated.fit()
    torch.manual_seed(0)
    silent = MultiBitTrainer(small_net(), train, None, config, quiet=True)
    silent.fit()
    assert seen == [True, True]
    a, b = dict(evaluated.models.named_parameters()), dict(silent.models.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
