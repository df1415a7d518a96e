"""Issue 15 (hardening), items 5-19 at the library level: divergence, collapse, explicit data directories,
layers that never run their forward, zero sensitivities, imagefolder transforms, bounded parsing, one result
schema, one first/last-layer rule, a convert default that approximates the float model, error types and
documented signatures. (Items 1-4: test_outdir.py; the command line's bad inputs: test_cli_cases.py.)"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anybit
from anybit import data, mixed
from anybit.checkpoint import write_json
from anybit.cli import main
from anybit.data.idx import write_idx
from anybit.models import create
from anybit.quant import DEFAULT_KEEP_FIRST_LAST, check_layers_run, parse_bit_list, quant_layers
from anybit.train import DivergenceError, MultiBitTrainer, NoSwitchableBNError, TrainConfig, TrainConfigError
from anybit.train.config import TRAINING_KEEP_FIRST_LAST

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def synthetic():
    return (data.load("synthetic", "train", num_samples=64, channels=1, image_size=8),
            data.load("synthetic", "test", num_samples=32, channels=1, image_size=8))


def small_net():
    torch.manual_seed(0)
    return create("resnet20", width=0.25, in_channels=1)


# ---------------------------------------------------------------------- 5. divergence
def test_divergence_stops_at_the_first_non_finite_loss_and_keeps_the_last_good_state(synthetic, tmp_path):
    with pytest.raises(TrainConfigError, match="finite"):
        TrainConfig(lr=math.inf)
    with pytest.raises(TrainConfigError, match="finite"):
        TrainConfig(weight_decay=math.inf)
    train, test = synthetic
    config = TrainConfig(bits=(2, 32), epochs=6, batch_size=32, eval_every=0, final_bn_batches=0)
    diverged = []                        # the loss becomes NaN from epoch 3 on, as with a learning rate far too high

    def after_epoch(trainer, record):
        diverged.append(record["epoch"] >= 2)

    trainer = MultiBitTrainer(small_net(), train, test, config, quiet=True, out_dir=tmp_path / "run",
                              on_epoch_end=after_epoch)
    fc = [m for m in trainer.models.modules() if isinstance(m, torch.nn.Linear)][-1]
    fc.register_forward_hook(lambda mod, inp, out: out * float("nan") if diverged and diverged[-1] else None)
    with pytest.raises(DivergenceError, match=r"--lr") as info:
        trainer.fit()
    assert isinstance(info.value, ValueError) and re.search(r"became (nan|inf|-inf)", str(info.value))
    assert all(torch.isfinite(p).all() for p in trainer.models.parameters())   # stopped before the step
    assert not (tmp_path / "run" / "model.safetensors").exists()               # no NaN checkpoint
    from anybit.train.state import load_state
    epoch, state = load_state(tmp_path / "run")
    assert epoch == 2 and all(torch.isfinite(v).all() for v in state["models"].values() if v.is_floating_point())


def test_run_json_is_always_valid_json(tmp_path):
    write_json(tmp_path / "run.json", {"loss": float("nan"), "nested": [float("inf"), 1.5], "t": torch.tensor(-math.inf)})
    text = (tmp_path / "run.json").read_text()
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in run.json"))
    assert strict == {"loss": None, "nested": [None, 1.5], "t": None}


# ---------------------------------------------------------------------- 6. collapse
def test_a_training_that_collapses_to_one_output_warns(synthetic, tmp_path):
    train, test = synthetic

    def collapse(trainer, record):      # every bit-width now gives the fc bias for every input
        with torch.no_grad():
            trainer.models["all"].fc.weight.zero_()

    config = TrainConfig(bits=(2, 32), epochs=1, batch_size=32, final_bn_batches=0)
    trainer = MultiBitTrainer(small_net(), train, test, config, quiet=True, out_dir=tmp_path / "run",
                              on_epoch_end=collapse)
    with pytest.warns(UserWarning, match="training collapsed"):
        trainer.fit()
    assert "collapsed" in json.loads((tmp_path / "run" / "run.json").read_text())["warnings"][0]
    healthy = MultiBitTrainer(small_net(), train, test, config, quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        healthy.fit()


def test_one_bit_width_that_collapses_to_one_class_warns(synthetic, tmp_path):
    train, test = synthetic

    def collapse_2_bits(trainer, record):     # only the 2-bit model now predicts the fc bias's class
        with torch.no_grad():
            trainer.models["b2"].fc.weight.zero_()
            trainer.models["b2"].fc.bias.copy_(torch.arange(trainer.models["b2"].fc.bias.numel()).float())

    config = TrainConfig(method="dedicated", bits=(2, 32), epochs=6, batch_size=16, final_bn_batches=0)
    trainer = MultiBitTrainer(small_net(), train, test, config, quiet=True, out_dir=tmp_path / "run",
                              on_epoch_end=collapse_2_bits)
    with pytest.warns(UserWarning, match="training collapsed at 2 bits"):
        trainer.fit()
    assert "collapsed at 2 bits" in json.loads((tmp_path / "run" / "run.json").read_text())["warnings"][0]


# ---------------------------------------------------------------------- 7. explicit data directories
def test_an_explicit_data_dir_is_used_or_refused_and_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    (tmp_path / "fm").mkdir()
    for prefix, n in (("train", 64), ("t10k", 32)):
        write_idx(tmp_path / "fm" / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), np.uint8))
        write_idx(tmp_path / "fm" / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    args = ["train", "--dataset", "fashion-mnist", "--data-dir", "fm", "--width", "0.25", "--bits", "32",
            "--epochs", "1", "--batch-size", "32", "--quiet", "--out", "run"]
    assert main(args) == 0
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["config"]["data_source"] == {"train": "fm", "test": "fm"}
    (tmp_path / "fm" / "t10k-images-idx3-ubyte").unlink()           # one split only: refused, not replaced
    capsys.readouterr()
    assert main([*args[:-1], "run2"]) == 2
    err = capsys.readouterr().err
    assert "test split) not found" in err and "/usr/share/datasets/fashion-mnist (" not in err
    assert not (tmp_path / "run2").exists()


# ---------------------------------------------------------------------- 8. layers that never run
class FunctionalParent(nn.Module):
    """Hands its child's weight to F.linear, as torchvision's Swin does with attn.qkv / attn.proj."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.mid(F.relu(self.stem(x)))).mean((2, 3))
        return self.head(F.linear(x, self.proj.weight, self.proj.bias))


def test_layers_whose_weight_the_parent_uses_are_left_float_and_never_counted(tmp_path):
    model = anybit.convert(FunctionalParent(), keep_first_last=None)
    x = torch.randn(2, 1, 8, 8)
    with pytest.warns(UserWarning, match="1 of 4 converted layers never ran"):
        infos = anybit.quantizable_layers(model, x)
    assert [i.name for i in infos] == ["stem", "mid", "head"] and type(model.proj) is nn.Linear
    report = anybit.conversion_report(model)
    assert "proj" not in report["converted"] and report["not_run"] == ["proj"]
    assert any(u["name"] == "proj" for u in report["unsupported"])
    cost = mixed.cost_model(model, [4, 8], "size", x)
    assert "proj" not in cost.layers and cost.float_cost == 32 * sum(i.params for i in infos)
    anybit.save(model, tmp_path / "m")
    loaded = anybit.load(tmp_path / "m", model=FunctionalParent())   # reloads the same way, proj float
    assert type(loaded.proj) is nn.Linear and set(quant_layers(loaded)) == {"stem", "mid", "head"}


def test_pins_move_to_the_first_and_last_layers_that_run():
    class LastIsFunctional(FunctionalParent):
        def forward(self, x):
            x = F.relu(self.mid(F.relu(self.stem(x)))).mean((2, 3))
            return F.linear(self.proj(x), self.head.weight, self.head.bias)

    model = anybit.convert(LastIsFunctional(), keep_first_last=8)
    with pytest.warns(UserWarning):
        assert check_layers_run(model, torch.randn(1, 1, 8, 8)) == ["head"]
    assert anybit.conversion_report(model)["pinned"] == ["stem", "proj"] and model.proj.pinned == (8, 8)


def test_torchvision_swin_attention_projections_are_reported_not_quantized():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.swin_t(num_classes=10)
    anybit.convert(model)
    assert len(quant_layers(model)) == 53
    with pytest.warns(UserWarning, match="24 of 53"):
        infos = anybit.quantizable_layers(model, torch.randn(1, 3, 32, 32))
    assert len(infos) == 29 and not any(i.name.endswith(("attn.qkv", "attn.proj")) for i in infos)


def test_a_model_left_with_nothing_to_quantize_is_refused(synthetic):
    two = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(TrainConfigError, match="identical copies"):
        MultiBitTrainer(two, synthetic[0], config=TrainConfig(bits=(2, 32)))
    with pytest.warns(UserWarning, match="nothing is left to quantize"):
        anybit.convert(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 10)), keep_first_last=8)


# ---------------------------------------------------------------------- 9. zero sensitivities
class DeadBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.dead = nn.Linear(8, 8)
        self.second = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.first(x))
        return self.head(torch.relu(self.second(h)) + 0.0 * self.dead(h))


def test_zero_sensitivities_are_flagged_not_free():
    torch.manual_seed(0)
    model = anybit.convert(DeadBranch(), keep_first_last=None, act="fixed", act_range=(-4.0, 4.0))
    x = torch.randn(64, 8)
    sens = mixed.sensitivity(model, x, [2, 8], quiet=True)
    assert sens.insensitive == ["dead"]
    cost = mixed.cost_model(model, [2, 8], "size", x[:1])
    with pytest.warns(UserWarning, match="sensitivity 0"):
        alloc = mixed.allocate(sens, cost, budget=0.2)
    assert alloc.choices["dead"] == (8, 8)                        # the highest option, not the free 2 bits
    greedy = mixed.allocate_greedy(sens, cost, 0.2)
    assert greedy.choices["dead"] == (8, 8)
    flat = mixed.Sensitivity(sens.layers, sens.options, np.zeros_like(sens.delta), 0.0)
    with pytest.raises(mixed.MixedPrecisionError, match="every layer is 0"):
        mixed.allocate(flat, cost, budget=0.5)


# ---------------------------------------------------------------------- 10. imagefolder transforms
def test_imagefolder_transforms_fit_the_image_size_and_augmentation_is_an_option(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    test = data.load("imagefolder", "test", data_dir=tmp_path, image_size=8)
    pixels = np.asarray(Image.open(tmp_path / "val" / "a" / "0.png").convert("RGB"), dtype=np.float32) / 255
    mean, std = np.array(data.registry.IMAGENET_MEAN), np.array(data.registry.IMAGENET_STD)
    expected = torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1)).float()
    assert torch.allclose(test[0][0], expected, atol=1e-5)         # 8x8 images at image_size=8: untouched
    plain = data.load("imagefolder", "train", data_dir=tmp_path, image_size=8, augment="false")
    assert plain.augment is False and torch.equal(plain[1][0], plain[1][0])
    augmented = data.load("imagefolder", "train", data_dir=tmp_path, image_size=8)
    names = [type(t).__name__ for t in augmented.folder.transform.transforms]
    assert "RandomCrop" in names and "RandomResizedCrop" not in names
    big = [type(t).__name__ for t in data.registry.imagefolder_transforms(224, True)]
    assert big == ["RandomResizedCrop", "RandomHorizontalFlip"]
    with pytest.raises(ValueError, match="augment='maybe' must be true or false"):
        data.load("imagefolder", "train", data_dir=tmp_path, image_size=8, augment="maybe")


# ---------------------------------------------------------------------- 11, 12. bounded before built
def test_huge_ranges_and_headers_fail_before_anything_is_built(tmp_path):
    import gzip
    import struct

    start = time.perf_counter()
    with pytest.raises(anybit.BitsError, match="not a valid bit-width"):
        parse_bit_list("1-1000000000")
    with pytest.raises(mixed.MixedPrecisionError, match="at most 200"):
        mixed.parse_sweep("0.1:0.9:1e-9")
    with pytest.raises(mixed.MixedPrecisionError, match="finite"):
        mixed.parse_sweep("0.1:inf:0.1")
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    bomb.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, 3_000_000, 28, 28) + bytes(1 << 20)))
    with pytest.raises(data.DatasetFormatError, match="more than anybit reads"):
        data.idx.read_idx(bomb)
    assert time.perf_counter() - start < 2.0
    for bad in ("1,,2", "1_6", "\u0664", ""):
        with pytest.raises(anybit.BitsError):
            parse_bit_list(bad)


# ---------------------------------------------------------------------- 15. one result schema
RESULT_KEYS = {"accuracy", "loss", "samples", "seconds"}
FINAL_KEYS = {"accuracy", "loss", "train_accuracy", "train_loss", "objective", "train_seconds"}


def test_one_result_schema_keyed_by_int_bits(synthetic, tmp_path):
    train, test = synthetic
    trainer = MultiBitTrainer(small_net(), train, test, TrainConfig(bits=(2, 32), epochs=1, batch_size=32),
                              quiet=True, out_dir=tmp_path / "run")
    result = trainer.fit()
    assert set(result["final"]) == {2, 32} and all(set(m) == FINAL_KEYS for m in result["final"].values())
    assert set(result["samples"]) == {2, 32}
    evaluated = trainer.evaluate(bits=[2, 32])
    assert set(evaluated) == {2, 32} and all(set(r) == RESULT_KEYS for r in evaluated.values())
    assert evaluated[2]["accuracy"] == pytest.approx(result["final"][2]["accuracy"])
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert set(record["metrics"]["final"]) == {"2", "32"} and set(record["metrics"]["final"]["2"]) == FINAL_KEYS
    doc = (DOCS / "results.md").read_text()
    assert all(f"`{k}`" in doc for k in RESULT_KEYS | FINAL_KEYS)


# ---------------------------------------------------------------------- 16, 17. one pin rule, a faithful default
def test_one_first_last_rule():
    from anybit.ptq import PTQConfig

    assert anybit.QuantSpec().keep_first_last == PTQConfig().keep_first_last == DEFAULT_KEEP_FIRST_LAST == 8
    assert TrainConfig().keep_first_last == TRAINING_KEEP_FIRST_LAST == 32
    from anybit.cli import build_parser

    mixed_parser = build_parser()._subparsers._group_actions[0].choices["mixed"]
    assert mixed_parser.get_default("pin_first_last") == DEFAULT_KEEP_FIRST_LAST
    assert "DEFAULT_KEEP_FIRST_LAST" in (DOCS / "quantization.md").read_text()


def test_plain_convert_approximates_the_float_model():
    torch.manual_seed(0)
    float_model = create("resnet20", width=0.5).eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        ref = float_model(x)
    model = anybit.convert(create("resnet20", width=0.5))
    model.load_state_dict(float_model.state_dict(), strict=False)
    model.eval()
    anybit.calibrate_activations(model, x)
    with anybit.precision(model, 8), torch.no_grad():
        error = float((model(x) - ref).norm() / ref.norm())
    assert anybit.QuantSpec().weight == "symmetric" and error < 0.1, error


# ---------------------------------------------------------------------- 18. error types and inputs
def test_error_types_and_inputs_match_the_docs(synthetic):
    with pytest.raises(mixed.MixedPrecisionError):
        mixed.resolve_options("0,4")
    with pytest.raises(anybit.BitsError):
        mixed.resolve_options("4,33")
    switchable = anybit.convert(small_net(), bn="switchable", bn_bits=(2, 32))
    with pytest.raises(mixed.MixedPrecisionError, match="shared BatchNorm"):
        mixed.sensitivity(switchable, torch.randn(4, 1, 8, 8), [2], quiet=True)
    model = anybit.convert(small_net(), keep_first_last=None)
    assert anybit.calibrate_activations(model, synthetic[0]) == len(quant_layers(model))   # a Dataset
    no_bn = anybit.convert(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10),
                                         nn.Linear(10, 10)), keep_first_last=None)
    loader = data.make_loader(synthetic[0], 16, shuffle=False)
    with pytest.raises(NoSwitchableBNError, match="has no BatchNorm"):
        anybit.train.recalibrate_bn(no_bn, loader, 4)
    assert set(json.dumps(anybit.train.__all__)) and "DivergenceError" in anybit.train.__all__
    mixed_doc = (DOCS / "mixed.md").read_text()
    assert "MixedBitsError" in mixed_doc


# ---------------------------------------------------------------------- 19. documented signatures
def test_training_md_lists_every_trainconfig_field_with_its_default():
    text = (DOCS / "training.md").read_text()
    signature = re.search(r"`TrainConfig\((.*?)\)`", text, re.S)[1]
    documented = dict(re.findall(r"(\w+)=(\([^)]*\)|[^,]+)", " ".join(signature.split())))
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert set(documented) == set(fields)
    for name, default in fields.items():
        assert documented[name].strip().replace('"', "'") == repr(default), name
    ptq_doc = (DOCS / "ptq.md").read_text()
    assert "emqnet" in ptq_doc and "refused" in ptq_doc
    assert "--method dedicated --bits 32" in (DOCS / "mixed.md").read_text()
