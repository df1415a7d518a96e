"""The small ViT: shapes, exactness at 32 bits, signed activation grids, attention quantization, multi-bit
training with every method, and the command line (model options, checkpoints that rebuild it)."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import torch
from torch import nn

import anybit
from anybit import data
from anybit.cli import main
from anybit.models import VisionTransformer, create
from anybit.quant import ActivationPoint, ActQuantizer, QuantAct, QuantSpec, SpecError
from anybit.quant.functional import fake_quant_fixed_grid
from anybit.train import METHODS, MultiBitTrainer, TrainConfig
from anybit.train.methods import has_batchnorm

SMALL = dict(embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0)
SIGNED = QuantSpec(act="fixed", act_range=(-1.0, 1.0), act_signed=True, keep_first_last=32)
ATTN = QuantSpec(**{**SIGNED.to_dict(), "attn_matmul": True, "attn_softmax": True})


def small_vit(image_size=16, in_channels=1, **kw) -> VisionTransformer:
    torch.manual_seed(0)
    return create("vit_tiny", image_size=image_size, in_channels=in_channels, **{**SMALL, "patch_size": 4, **kw})


def converted(model, spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anybit.convert(model, spec)


@pytest.mark.parametrize("image_size, patch, tokens", [(28, 4, 49), (28, 7, 16), (32, 4, 64), (32, 7, 25), (28, 8, 16)])
@pytest.mark.parametrize("channels", [1, 3])
def test_builds_for_28_and_32_pixels_and_1_or_3_channels(image_size, patch, tokens, channels):
    model = create("vit_tiny", image_size=image_size, patch_size=patch, in_channels=channels, num_classes=7,
                   **SMALL).eval()
    assert model.patch_embed.num_patches == tokens and model.pos_embed.shape == (1, tokens, 32)
    assert not has_batchnorm(model) and any(isinstance(m, nn.LayerNorm) for m in model.modules())
    with torch.no_grad():
        assert model(torch.randn(2, channels, image_size, image_size)).shape == (2, 7)
    assert model.anybit_meta["arch"] == "vit_tiny" and model.anybit_meta["arch_kwargs"]["image_size"] == image_size


def test_padding_class_token_width_and_bad_arguments():
    padded = create("vit_tiny", image_size=28, patch_size=8, **SMALL)
    assert padded.patch_embed.padding == (2, 2, 2, 2)            # 28 -> 32, split evenly
    cls = create("vit_tiny", image_size=32, pool="cls", **SMALL).eval()
    assert cls.pos_embed.shape[1] == 65 and cls.cls_token.shape == (1, 1, 32)
    assert create("vit_tiny", width=0.5, **SMALL).embed_dim == 16
    assert create("vit_tiny", embed_dim=30, num_heads=4, depth=1).embed_dim == 32   # a multiple of the heads
    default = create("vit_tiny")
    assert (default.embed_dim, len(default.blocks), default.blocks[0].attn.num_heads) == (128, 6, 4)
    with pytest.raises(ValueError, match="built for 32x32 images.*image_size=28"):
        cls(torch.randn(1, 3, 28, 28))
    for kwargs, match in [({"depth": 0}, "depth=0"), ({"patch_size": 2.5}, "patch_size"), ({"pool": "max"}, "pool"),
                          ({"width": 0}, "width"), ({"patch_size": 40}, "larger than image_size"),
                          ({"mlp_ratio": 0}, "mlp_ratio")]:
        with pytest.raises(ValueError, match=match):
            create("vit_tiny", **kwargs)


@pytest.mark.parametrize("spec", [QuantSpec(keep_first_last=32), SIGNED, ATTN, QuantSpec(act_signed=True, attn_matmul=True)],
                         ids=["default", "signed", "attention", "learned"])
def test_exactly_float_at_32_bits_after_conversion(spec):
    model = small_vit(in_channels=3).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        q = converted(copy.deepcopy(model), spec).eval()
        assert torch.equal(q(x), expected)
    names = anybit.quant.quant_layers(q)
    assert list(names)[0] == "patch_embed.proj" and list(names)[-1] == "head"   # first/last: pinned ends
    assert len(names) == 2 + 2 * 4                                            # qkv, proj, fc1, fc2 per block


def test_attention_quantization_changes_low_bit_outputs_and_follows_the_qkv_layer():
    model = small_vit().eval()
    x = torch.randn(4, 1, 16, 16)
    plain, attn = converted(copy.deepcopy(model), SIGNED).eval(), converted(copy.deepcopy(model), ATTN).eval()
    report = anybit.conversion_report(attn)["activations"]
    assert report[:5] == [f"blocks.0.attn.{n}" for n in ("q_in", "k_in", "v_in", "probs_in", "softmax_in")]
    assert anybit.conversion_report(plain)["activations"] == []
    assert all(isinstance(m, ActivationPoint) for n, m in plain.named_modules() if n.endswith("_in"))
    assert anybit.quant.quant_layers(attn).keys() == anybit.quant.quant_layers(plain).keys()   # not weight layers
    with torch.no_grad():
        for bits in (4, 8):
            with anybit.precision(plain, bits), anybit.precision(attn, bits):
                assert not torch.allclose(plain(x), attn(x), atol=1e-4), bits
        # attention inputs run at the activation bits of the qkv layer before them: a bit map that keeps one
        # block's qkv in float keeps its attention matmuls in float too
        seen = {}
        hook = attn.blocks[0].attn.q_in.register_forward_hook(lambda m, i, o: seen.update(bits=m.a_bits))
        anybit.set_precision(attn, 4)
        attn(x)
        assert seen["bits"] == 4
        anybit.set_precision(attn, {"blocks.0.attn.qkv": 32})
        attn(x)
        assert seen["bits"] == 32
        hook.remove()
    # the softmax input is quantized relative to its row maximum: shifting the scores changes nothing
    q = QuantAct("softmax_input", ActQuantizer("fixed", (-8.0, 0.0)))
    q.precision_trace = anybit.quant.PrecisionTrace()
    q.precision_trace.last = (2, 2)
    s = torch.randn(3, 5) * 4
    assert torch.equal(q(s).softmax(-1), q(s + 10).softmax(-1))
    assert len(torch.unique(q(s) - q(s).amax(-1, keepdim=True))) <= 4


def test_signed_activation_grid():
    x = torch.linspace(-1.5, 1.5, 31, requires_grad=True)
    fixed = ActQuantizer("fixed", (-1.0, 1.0), signed=True)
    assert fixed.lo.item() == -1.0 and fixed.hi.item() == 1.0
    assert ActQuantizer("fixed", (0.0, 2.0), signed=True).lo.item() == -2.0    # r = max |range|
    assert sorted(set(fixed(x, 2).tolist())) == [-1.0, 0.0, 1.0]               # zero exact, 2^(b-1) - 1 a side
    assert len(set(fixed(x, 3).tolist())) == 7 and len(set(fixed(torch.linspace(-1, 1, 1001), 8).tolist())) == 255
    assert fixed(torch.tensor([0.0]), 4).item() == 0.0
    fixed(x, 2).sum().backward()                                               # straight through inside the grid
    assert torch.equal(x.grad, (x.abs() < 1.5).float())
    # 1 bit: the threshold code {0, r}, as the 2-bit grid for inputs >= -r/2
    assert sorted(set(fixed(x, 1).tolist())) == [0.0, 1.0]
    assert torch.equal(fixed(x, 1), torch.round(x).clamp(0, 1))
    unsigned = ActQuantizer("fixed", (-1.0, 1.0))                              # unsigned over [-1, 1]: {0, 2}
    assert sorted(set(unsigned(x, 1).tolist())) == [0.0, 2.0]
    # the CPU path equals PyTorch's fused kernel on the signed grid
    y = torch.randn(1000) * 2
    ref = torch.fake_quantize_per_tensor_affine(y, 1.0 / 7, 0, -7, 7)
    assert torch.equal(fake_quant_fixed_grid(y, torch.tensor(1.0 / 7), torch.tensor(0), 4, signed=True), ref)
    # learned: the range starts at the first batch's max |x| and gets gradients at every bit-width
    learned = ActQuantizer("learned", signed=True).train()
    learned(torch.tensor([-3.0, 0.5, 2.0]), 4)
    assert learned.hi.item() == 3.0 and learned.lo.item() == -3.0 and not learned.lo.requires_grad
    for bits in (1, 2, 4):
        learned.hi.grad = None
        learned(torch.randn(64) * 2, bits).pow(2).sum().backward()
        assert learned.hi.grad is not None and learned.hi.grad.abs() > 0, bits
    with pytest.raises(SpecError, match="act_signed"):
        QuantSpec(act_signed="yes")


def test_method_specs_depend_on_batchnorm_not_on_the_model_name():
    config = TrainConfig(method="emqnet", bits=(1, 4, 32)).resolved()
    cnn = METHODS["emqnet"].spec_for(config, create("resnet20", width=0.25))
    assert cnn == METHODS["emqnet"].spec_for(config) == METHODS["emqnet"].quant_spec((1, 4, 32), 32, "per-precision")
    assert (cnn.act, cnn.act_range, cnn.act_signed, cnn.wbc) == ("fixed", (0.0, 1.0), False, True)
    vit = METHODS["emqnet"].spec_for(config, small_vit())
    assert (vit.act, vit.act_range, vit.act_signed) == ("fixed", (-1.0, 1.0), True)
    assert not vit.attn_matmul and not vit.attn_softmax
    no_bn = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    assert METHODS["emqnet"].spec_for(config, no_bn) == vit


@pytest.fixture(scope="module")
def datasets():
    train = data.load("synthetic", "train", num_samples=256, channels=1, image_size=16)
    test = data.load("synthetic", "test", num_samples=64, channels=1, image_size=16)
    return train, test


BITS = (1, 2, 4, 32)


@pytest.mark.parametrize("method", ["dedicated", "anyprecision", "emqnet"])
def test_trains_multi_bit_with_falling_loss_at_every_bit_width(datasets, method):
    train, test = datasets
    config = TrainConfig(bits=BITS, method=method, epochs=3, batch_size=16, optimizer="adam", lr=3e-3,
                         coreset_fraction=None if method == "dedicated" else 1.0, eval_every=0)
    trainer = MultiBitTrainer(small_vit(depth=1), train, test, config, quiet=True)
    result = trainer.fit()
    first, last = result["history"][0]["bits"], result["history"][-1]["bits"]
    for b in BITS:
        assert last[str(b)]["ce"] < first[str(b)]["ce"] - 0.1, (method, b, first[str(b)], last[str(b)])
    assert result["final"][32]["accuracy"] > 30.0
    spec = trainer.model_for(4).anybit_meta["quant_spec"]
    assert spec["act_signed"] and tuple(spec["act_range"]) == (-1.0, 1.0)
    assert all(result["samples"][b]["final_bn"] == 0 for b in BITS)     # no BatchNorm: no statistics pass
    for b in (3, 5):                                # untrained bit-widths run as they are
        assert trainer.evaluate([b])[b]["accuracy"] >= 0


def test_emqnet_default_recipe_and_attention_quantization_train(datasets):
    train, _ = datasets
    spec = METHODS["emqnet"].spec_for(TrainConfig(bits=BITS).resolved(), small_vit())
    model = converted(small_vit(), dataclasses.replace(spec, attn_matmul=True, attn_softmax=True))
    config = TrainConfig(bits=BITS, epochs=2, batch_size=16, optimizer="adam", lr=3e-3, eval_every=0)
    result = MultiBitTrainer(model, train, None, config, quiet=True).fit()
    assert all(m["samples"] == 48 for m in result["history"][-1]["bits"].values())   # 20 % subsets, 16-sample batches
    learned = [m for m in model.modules() if isinstance(m, QuantAct) and m.role == "matmul"]
    assert learned and all(bool(m.input_quant.initialized) for m in learned)


def test_calibrate_activations_reaches_attention_inputs():
    model = converted(small_vit(), QuantSpec(act_signed=True, attn_matmul=True, keep_first_last=32)).eval()
    x = torch.randn(8, 1, 16, 16)
    with anybit.precision(model, 4), pytest.raises(ValueError, match="not calibrated"):
        model(x)
    anybit.calibrate_activations(model, x)
    with anybit.precision(model, 4), torch.no_grad():
        assert torch.isfinite(model(x)).all()
    probs = model.blocks[0].attn.probs_in.input_quant
    assert (probs.lo.item(), probs.hi.item()) == (0.0, 1.0)                   # fixed grid left alone


def test_float_copy_restores_activation_points():
    from anybit.ptq.floatcopy import float_copy

    model = small_vit().eval()
    q = converted(copy.deepcopy(model), ATTN)
    plain = float_copy(q)
    assert not any(isinstance(m, QuantAct) for m in plain.modules())
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


@pytest.mark.parametrize("spec", [SIGNED, QuantSpec(act_signed=True, attn_matmul=True, attn_softmax=True,
                                                    keep_first_last=8)], ids=["fixed", "learned-attention"])
def test_checkpoint_round_trip_of_a_converted_vit_gives_identical_outputs(tmp_path, spec):
    model = converted(small_vit(pool="cls"), spec).train()
    x = torch.randn(4, 1, 16, 16)
    with anybit.precision(model, 4):
        model(x)                                               # learned ranges start at the first batch
    model.eval()
    anybit.set_precision(model, {"blocks.0.attn.qkv": 2})
    expected = {}
    with torch.no_grad():
        expected["map"] = model(x)
        for b in (1, 3, 4, 32):
            with anybit.precision(model, b):
                expected[b] = model(x)
    anybit.save(model, tmp_path / "vit", bits=[1, 4, 32])
    loaded = anybit.load(tmp_path / "vit").eval()
    assert isinstance(loaded, VisionTransformer) and loaded.cls_token is not None
    assert anybit.get_precision(loaded) == anybit.get_precision(model)
    assert anybit.conversion_report(loaded)["activations"] == anybit.conversion_report(model)["activations"]
    assert loaded.blocks[0].attn.qkv.input_quant.signed
    with torch.no_grad():
        assert torch.equal(loaded(x), expected["map"])
        for b in (1, 3, 4, 32):
            with anybit.precision(loaded, b):
                assert torch.equal(loaded(x), expected[b]), b


DATA = ["--dataset", "synthetic", "--data-option", "num_samples=64", "--data-option", "channels=3",
        "--data-option", "image_size=12"]


def vit_args(out, *extra):
    return ["train", "--model", "vit_tiny", *DATA, "--model-option", "patch_size=4", "--model-option", "embed_dim=16",
            "--model-option", "depth=1", "--model-option", "num_heads=2", "--bits", "2,32", "--epochs", "1",
            "--batch-size", "16", "--optimizer", "adam", "--out", str(out), "--quiet", "--device", "cpu", *extra]


@pytest.mark.parametrize("method", ["dedicated", "anyprecision", "emqnet"])
def test_cli_trains_every_method_and_the_checkpoint_rebuilds_it(tmp_path, capsys, method):
    out = tmp_path / method
    assert main(vit_args(out, "--method", method, "--model-option", "pool=cls")) == 0
    meta = anybit.read_metadata(out)["model"]
    assert meta["arch"] == "vit_tiny"
    assert meta["arch_kwargs"] == {"num_classes": 10, "in_channels": 3, "width": 1.0, "image_size": 12,
                                   "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "pool": "cls"}
    model = anybit.load(out)
    assert isinstance(model, VisionTransformer) and model.cls_token is not None
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["model_options"] == {"patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2,
                                              "pool": "cls"}
    assert main(["eval", str(out), "--bits", "2,3,32", "--quiet"]) == 0     # untrained 3 bits: no BatchNorm needed
    metrics = json.loads((out / "eval" / "run.json").read_text())["metrics"]
    assert set(metrics) == {"2", "3", "32"}
    capsys.readouterr()
    assert main(["eval", str(out), "--bits", "2", "--quiet", "--data-option", "image_size=16"]) == 2
    assert "takes 12x12 images" in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [
    ("patch_size", "is not KEY=VALUE"),
    ("=4", "is not KEY=VALUE"),
    ("heads=4", "heads is not an option of vit_tiny: it takes patch_size, embed_dim, depth, num_heads, mlp_ratio, pool"),
    ("num_classes=3", "comes from the dataset's classes"),
    ("image_size=32", "comes from the dataset's image size"),
    ("width=2", "comes from --width"),
    ("depth=0", "depth=0 must be a positive integer"),
    ("pool=max", "pool='max' is unknown"),
])
def test_cli_model_options_are_validated(tmp_path, monkeypatch, capsys, option, message):
    monkeypatch.setattr(MultiBitTrainer, "fit", lambda *a, **k: pytest.fail("trained despite a bad option"))
    out = tmp_path / "run"
    assert main(vit_args(out, "--model-option", option)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not out.exists()


def test_cli_model_options_of_resnets(tmp_path, capsys):
    args = ["train", "--model", "resnet20", *DATA, "--out", str(tmp_path / "r"), "--quiet", "--model-option", "depth=3"]
    assert main(args) == 2
    assert "depth is not an option of resnet20: it takes none" in capsys.readouterr().err


def test_exports_of_signed_grids_packed_works_onnx_refuses(tmp_path):
    from anybit.export import ExportError

    pytest.importorskip("onnx")
    model = converted(small_vit(), SIGNED).eval()
    x = torch.randn(2, 1, 16, 16)
    anybit.set_precision(model, 4)
    with torch.no_grad():
        expected = model(x)
    anybit.export(model, tmp_path / "packed", bits=4, example_input=x)
    packed = anybit.load(tmp_path / "packed").eval()
    with torch.no_grad():
        assert torch.allclose(packed(x), expected, atol=1e-5)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 12 * 12, 3))
    cnn = converted(cnn, dataclasses.replace(SIGNED, keep_first_last=None)).eval()
    anybit.set_precision(cnn, 4)
    with pytest.raises(ExportError, match="signed grid"):
        anybit.export(cnn, tmp_path / "onnx", bits=4, format="onnx", example_input=torch.randn(2, 1, 16, 16))
