"""Exports: packed codes round-trip, packed models equal the fake-quantized ones, every-precision packages,
ONNX QDQ graphs on ONNX Runtime, corrupt files and CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import anybit
from anybit.cli import main
from anybit.export import ExportError, ExportFileError, pack_codes, packed_nbytes, unpack_codes, weight_codes
from anybit.models import create
from anybit.quant import FrozenPrecisionError


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------ bit packing
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 13, 64, 1001])
def test_pack_unpack_round_trips_every_bit_width_and_odd_sizes(bits, count):
    codes = torch.randint(0, 2**bits, (count,))
    codes[0], codes[-1] = 0, 2**bits - 1
    data = pack_codes(codes, bits)
    assert data.dtype == torch.uint8 and data.numel() == packed_nbytes(count, bits) == (count * bits + 7) // 8
    assert torch.equal(unpack_codes(data, bits, count), codes)


def test_unpack_refuses_a_buffer_of_the_wrong_length_and_pack_codes_out_of_range():
    data = pack_codes(torch.arange(8) % 8, 3)
    with pytest.raises(ValueError, match="take 3 bytes"):
        unpack_codes(data[:-1], 3, 8)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_codes(torch.tensor([8]), 3)


# ------------------------------------------------------------------------------------------ codes
SPECS = {
    "emqnet": dict(wbc=True, bn_stats="per-precision", bn_bits=(1, 2, 4, 8, 32), act="fixed", act_clip_float=True,
                   keep_first_last=32),
    "symmetric": dict(weight="symmetric", act="fixed", keep_first_last=8),
    "asymmetric-per-tensor": dict(weight="asymmetric", weight_per_channel=False, act="fixed"),
    "dorefa-per-channel": dict(weight_per_channel=True, wbc=True, act="fixed"),
}


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS)
def test_codes_reproduce_every_quantizer_at_every_bit_width(spec):
    layer = anybit.convert(nn.Sequential(nn.Conv2d(3, 5, 3)), **{**spec, "keep_first_last": None})[0]
    for bits in range(1, 17):
        codes = weight_codes(layer, "weight", bits)
        assert codes.qmin <= int(codes.codes.min()) and int(codes.codes.max()) <= codes.qmax
        a, b = codes.channel_affine()   # the affine map of the codes the ONNX export folds
        q = codes.codes.reshape(5, -1).double()
        assert torch.allclose(a[:, None] * q + b[:, None], codes.dequantize().reshape(5, -1).double(), atol=1e-6)


def _model(spec: dict, width: float = 0.25, classes: int = 10) -> tuple[nn.Module, torch.Tensor]:
    model = create("resnet20", width=width, num_classes=classes)
    anybit.convert(model, **spec)
    x = torch.randn(6, 3, 12, 12)
    model.train()
    with torch.no_grad():   # BatchNorm statistics move (per precision where kept so)
        for b in (spec.get("bn_bits") or (8, 4)):
            anybit.set_precision(model, b)
            model(x)
    return model.eval(), x


def _out(model, x, bits=None):
    with torch.no_grad():
        if bits is None:
            return model(x)
        with anybit.precision(model, bits):
            return model(x)


@pytest.mark.parametrize("name", ["emqnet", "symmetric"])
def test_packed_model_equals_the_fake_quantized_model(tmp_path, name):
    model, x = _model(SPECS[name])
    for bits in (1, 3, 4, 8):
        summary = anybit.export(model, tmp_path / f"w{bits}", bits=bits, example_input=x[:2])
        loaded = anybit.load(tmp_path / f"w{bits}").eval()
        assert torch.equal(_out(loaded, x), _out(model, x, bits))
        assert summary["weights_vs_float_weights"] < bits / 32 + 0.01   # b/32 of the float weights, plus the ends
    anybit.set_precision(loaded, 4)
    with pytest.raises(FrozenPrecisionError, match="quantized at 8 bits"):
        _out(loaded, x)


def test_packed_export_folds_batchnorms_and_stores_only_what_the_precision_needs(tmp_path, monkeypatch):
    from anybit.export import packed

    model, x = _model(SPECS["emqnet"])
    anybit.export(model, tmp_path / "w4", bits=4, example_input=x[:2])
    sidecar, tensors = anybit.export.read_packed(tmp_path / "w4")
    # one statistics set per BatchNorm at one precision: folded into two terms per channel
    assert sidecar["packed"]["folded_bn"] and not any("running_" in k for k in tensors)
    # weight bias correction: the float weight's mean and std per channel, the rest follows from the codes
    assert not any("mean_q" in k or "gain" in k for k in tensors) and any("wbc_std_w" in k for k in tensors)
    assert torch.equal(_out(anybit.load(tmp_path / "w4").eval(), x), _out(model, x, 4))
    # should a BatchNorm kernel compute its terms otherwise, the export keeps the statistics and stays exact
    monkeypatch.setattr(packed, "_folded_terms", lambda mean, var, w, b, eps, dims: (w.clone() * 1.001, b.clone()))
    anybit.export(model, tmp_path / "kept", bits=4, example_input=x[:2])
    sidecar, tensors = anybit.export.read_packed(tmp_path / "kept")
    assert not sidecar["packed"]["folded_bn"] and any("running_mean_4" in k for k in tensors)
    assert torch.equal(_out(anybit.load(tmp_path / "kept").eval(), x), _out(model, x, 4))


def test_packed_symmetric_grids_store_no_zero_points(tmp_path):
    model, x = _model(SPECS["symmetric"])
    anybit.export(model, tmp_path / "w4", bits=4, example_input=x[:2])
    _, tensors = anybit.export.read_packed(tmp_path / "w4")
    assert any(k.endswith(".scale") for k in tensors) and not any(k.endswith(".zero_point") for k in tensors)
    assert not any(k.endswith("num_batches_tracked") for k in tensors)


def test_packed_bit_map_and_ptq_grids(tmp_path):
    model, x = _model(SPECS["symmetric"])
    layers = list(anybit.quant.quant_layers(model))
    model.get_submodule(layers[3]).weight_quant.set_range(3, torch.full((4,), 0.05), torch.full((4,), 3.0))
    bit_map = {name: ((2 + i % 4), 8) for i, name in enumerate(layers)}
    bit_map[layers[3]] = (3, 4)
    anybit.export(model, tmp_path / "map", bit_map=bit_map, example_input=x[:2])
    loaded = anybit.load(tmp_path / "map").eval()
    with torch.no_grad(), anybit.precision(model, bit_map):
        assert torch.equal(loaded(x), model(x))
    assert anybit.get_precision(loaded) == bit_map


@pytest.mark.parametrize("bits", [list(range(1, 9)), [1, 2, 4, 8, 32]], ids=["codes", "float"])
def test_every_precision_package_yields_each_precision_exactly(tmp_path, bits):
    model, x = _model(SPECS["emqnet"])
    summary = anybit.export(model, tmp_path / "pkg", bits=bits, example_input=x[:2])
    float_bytes = summary["float_state_bytes"]
    assert summary["file_bytes"] < float_bytes
    for b in bits:
        loaded = anybit.load(tmp_path / "pkg", bits=b).eval()
        assert torch.equal(_out(loaded, x), _out(model, x, b)), b
    with pytest.raises(ExportFileError, match="choose one"):
        anybit.load(tmp_path / "pkg")
    with pytest.raises(ExportFileError, match="not 3 bits" if 3 not in bits else "not 16 bits"):
        anybit.load(tmp_path / "pkg", bits=3 if 3 not in bits else 16)


def test_export_refuses_what_the_model_cannot_run_before_writing(tmp_path):
    model, x = _model(dict(bn="switchable", bn_bits=(2, 4), act="fixed"))
    with pytest.raises(ExportError, match="cannot run at 3 bits"):
        anybit.export(model, tmp_path / "e", bits=3, example_input=x)
    with pytest.raises(ExportError, match="1..8"):
        anybit.export(model, tmp_path / "e", bits=12, example_input=x)
    with pytest.raises(ExportError, match="example_input"):
        anybit.export(model, tmp_path / "e", bits=4)
    with pytest.raises(ValueError, match="not quantizable layers"):
        anybit.export(model, tmp_path / "e", bit_map={"nope": (4, 4)}, example_input=x)
    assert not (tmp_path / "e").exists()


def test_corrupt_or_truncated_packed_files_fail_clearly(tmp_path):
    model, x = _model(SPECS["symmetric"])
    anybit.export(model, tmp_path / "e", bits=4, example_input=x[:2])
    tensors = tmp_path / "e" / "model.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportFileError, match="corrupt or truncated"):
        anybit.load(tmp_path / "e")
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    tensors.write_bytes(bytes(flipped))
    with pytest.raises(ExportFileError, match="checksum"):
        anybit.load(tmp_path / "e")
    tensors.write_bytes(data)
    (tmp_path / "e" / "model.json").write_text("{not json")
    with pytest.raises(anybit.CheckpointError, match="not valid JSON"):
        anybit.load(tmp_path / "e")


# ------------------------------------------------------------------------------------------ ONNX
def _agreement(model, x, path):
    session = anybit.export.onnx_session(path, threads=1)
    with torch.no_grad():
        ref = model(x)
    got = session(x)
    return (got.argmax(1) == ref.argmax(1)).float().mean().item(), (got - ref).abs().max().item(), ref


def _typical_diff(model, x, path) -> float:
    """The median over images of the largest logit difference (an image whose float rounding moved an
    activation across a rounding boundary is one of a few)."""
    with torch.no_grad():
        ref = model(x)
    return (anybit.export.onnx_session(path, threads=1)(x) - ref).abs().amax(1).median().item()


def _fused_ops(path) -> set[str]:
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(str(path / "optimized.onnx")).graph.node}


@pytest.fixture(scope="module")
def trained():
    """A width-0.25 emqnet ResNet-20 trained briefly on synthetic data (clear margins between classes)."""
    from anybit.train import MultiBitTrainer, TrainConfig

    torch.manual_seed(0)
    train = anybit.data.load("synthetic", "train", num_samples=384, image_size=16)
    test = anybit.data.load("synthetic", "test", num_samples=256, image_size=16)
    config = TrainConfig(bits=(4, 8, 32), method="emqnet", epochs=3, batch_size=32, coreset_fraction=1.0,
                         distill="none", final_bn_batches=4, eval_every=0)
    trainer = MultiBitTrainer(create("resnet20", width=0.25), train, test, config, quiet=True)
    trainer.fit()
    x = torch.stack([test[i][0] for i in range(len(test))])
    return trainer.models["all"].eval(), x


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS)
def test_integer_weights_represent_every_grid_exactly(spec):
    """ONNX weights: int8 codes, scale, integer zero point and (weight bias correction only) a per-channel shift."""
    from anybit.export.onnx_qdq import integer_weights

    layer = anybit.convert(nn.Sequential(nn.Conv2d(3, 5, 3)), **{**spec, "keep_first_last": None})[0]
    for bits in range(1, 9):
        codes = weight_codes(layer, "weight", bits)
        a, b = (t.numpy() for t in codes.channel_affine())
        rep = integer_weights(codes.codes, codes.qmin, codes.qmax, a, b)
        assert rep["max_error_steps"] < 1e-5
        assert rep["codes"].min() >= -128 and rep["codes"].max() <= 127
        dorefa_8 = spec.get("weight", "dorefa") == "dorefa" and bits == 8   # half-integer zero point, no room for 2x
        assert bool((rep["shift"] != 0).any()) == (bool(spec.get("wbc")) or dorefa_8), bits


def test_integer_weights_of_a_constant_channel_are_its_shift():
    """A channel whose weights are all equal (a == 0: a zero scale or BatchNorm weight) is its shift alone; its
    check measures the shift's float32 rounding against the value, not against a step it does not have."""
    from anybit.export.onnx_qdq import integer_weights

    q = torch.tensor([[0, 1, 2, 3], [1, 1, 1, 1]])
    rep = integer_weights(q, 0, 3, np.array([0.1, 0.0]), np.array([-0.15, 0.3123456789]))
    assert rep["max_error_steps"] < 1e-6
    assert rep["shift"][0] == 0 and rep["shift"][1] == 0.3123456789


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_onnx_emqnet_resnet20_computes_what_the_fake_quantized_model_does(trained, tmp_path, bits):
    model, x = trained
    anybit.set_precision(model, bits)
    summary = anybit.export(model, tmp_path / "o", bits=bits, format="onnx", example_input=x[:4], calib_data=x[:128])
    agree, diff, ref = _agreement(model, x, tmp_path / "o")
    # weight bias correction folded exactly: only float rounding differs, which moves the rare activation that
    # lies on a rounding boundary by one step (at 8 bits, with 16x finer steps, in most images)
    assert agree >= 0.99
    assert _typical_diff(model, x, tmp_path / "o") <= (1e-2 if bits == 8 else 1e-5) * ref.abs().max().item()
    inner = [v for v in summary["layers"].values() if v["w_bits"] < 32]
    assert inner and all(v["weight_shift"] and v["kernel"] == "float" for v in inner)
    assert summary["requantized"] == 0   # float convolutions: nothing to requantize


def test_onnx_weight_shift_for_grouped_dilated_strided_convolutions_and_linear_layers(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, stride=2)
            self.c3 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.fc = nn.Linear(8 * 6 * 6, 5)

        def forward(self, x):
            x = torch.relu(self.b1(self.c1(x)))
            x = torch.relu(self.c2(x))
            return self.fc(torch.flatten(self.c3(x) + x, 1))

    model = anybit.convert(Net(), wbc=True, act="fixed", keep_first_last=None).eval()
    x = torch.rand(16, 3, 12, 12)
    anybit.calibrate_activations(model, x)
    for bits, int4 in ((4, False), (4, True), (8, False)):
        anybit.set_precision(model, bits)
        summary = anybit.export(model, tmp_path / "g", bits=bits, format="onnx", example_input=x[:2], int4=int4)
        agree, diff, ref = _agreement(model, x, tmp_path / "g")
        assert _typical_diff(model, x, tmp_path / "g") < (1e-2 if bits == 8 else 1e-5) * ref.abs().max().item()
        assert all(v["weight_shift"] for v in summary["layers"].values())
        assert {v["weight_type"] for v in summary["layers"].values()} == {"int4" if int4 else "int8"}


def test_onnx_symmetric_weights_run_on_integer_kernels_only(tmp_path):
    model, _ = _model(SPECS["symmetric"], width=0.5)
    x = torch.rand(16, 3, 16, 16) * 4 - 2
    anybit.set_precision(model, 8)
    summary = anybit.export(model, tmp_path / "o8", bits=8, format="onnx", example_input=x[:4], calib_data=x)
    agree, diff, ref = _agreement(model, x, tmp_path / "o8")
    assert diff < 0.1 * ref.abs().max().item()
    ops = _fused_ops(tmp_path / "o8")
    # convolutions, residual adds and the classifier on integer kernels; no float convolution, no DQ -> Q pair
    assert {"QLinearConv", "QLinearAdd", "QGemm"} <= ops and not ops & {"Conv", "Add", "Gemm"}
    assert all(v["kernel"] == "integer" and not v["weight_shift"] for v in summary["layers"].values())
    sidecar = json.loads((tmp_path / "o8" / "model.json").read_text())
    assert sidecar["format"] == "anybit-onnx" and len(sidecar["requantized"]) == summary["requantized"] > 0
    # without requantization: the residual branches run as float convolutions, exactly the PyTorch model
    summary = anybit.export(model, tmp_path / "x8", bits=8, format="onnx", example_input=x[:4], requantize=False)
    assert summary["requantized"] == 0
    _, exact_diff, _ = _agreement(model, x, tmp_path / "x8")
    assert exact_diff < diff and "Conv" in _fused_ops(tmp_path / "x8")


def test_onnx_converted_torchvision_model(tmp_path):
    x = torch.rand(8, 3, 32, 32)
    for spec, kernel in ((dict(wbc=True, act="fixed", keep_first_last=8), "float"),
                         (dict(weight="symmetric", act="fixed"), "integer")):
        model = torchvision.models.resnet18(num_classes=10)
        anybit.convert(model, **spec)
        model.eval()
        anybit.calibrate_activations(model, x)
        anybit.set_precision(model, 4)
        summary = anybit.export(model, tmp_path / kernel, bits=4, format="onnx", example_input=x[:2], calib_data=x)
        agree, diff, ref = _agreement(model, x, tmp_path / kernel)
        inner = [v for n, v in summary["layers"].items() if n not in ("conv1", "fc")]
        assert all(v["kernel"] == kernel for v in inner)
        if kernel == "float":   # exact: float rounding only
            assert _typical_diff(model, x, tmp_path / kernel) < 1e-5 * ref.abs().max().item()
        else:                   # requantized residual branches; random weights give near-tied logits
            assert diff < 0.5 * ref.abs().max().item()
            assert "QLinearConv" in _fused_ops(tmp_path / kernel)


def test_onnx_errors(tmp_path):
    model, x = _model(SPECS["symmetric"])
    with pytest.raises(ExportError, match="one precision"):
        anybit.export(model, tmp_path / "o", bits=[4, 8], format="onnx", example_input=x)
    anybit.export(model, tmp_path / "o", bits=8, format="onnx", example_input=x)
    onnx_file = tmp_path / "o" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:100])
    with pytest.raises(ExportFileError, match="corrupt or truncated"):
        anybit.export.onnx_session(tmp_path / "o")
    (tmp_path / "o" / "model.json").unlink()
    with pytest.raises(ExportFileError, match="could not be opened by ONNX Runtime"):
        anybit.export.onnx_session(tmp_path / "o")
    with pytest.raises(anybit.CheckpointError, match="anybit eval"):
        anybit.export(model, tmp_path / "p", bits=8, format="onnx", example_input=x)
        anybit.load(tmp_path / "p")


# ------------------------------------------------------------------------------------------ command line
@pytest.fixture()
def run_dir(tmp_path):
    model = create("resnet20", width=0.25, in_channels=1)
    anybit.convert(model, **SPECS["emqnet"])
    model.eval()
    anybit.set_precision(model, 8)
    anybit.save(model, tmp_path / "run" / "model", method="emqnet", bits_trained=[1, 2, 4, 8, 32],
                data={"dataset": "synthetic", "options": {"channels": 1, "num_samples": 64}})
    return tmp_path / "run"


def test_cli_export_packed_package_and_onnx_then_eval(run_dir, tmp_path, capsys):
    assert main(["eval", str(run_dir), "--bits", "3", "--quiet"]) == 0
    reference = capsys.readouterr().out.splitlines()[2].split()[2]
    assert main(["export", str(run_dir), "--bits", "3", "--out", str(tmp_path / "w3")]) == 0
    assert "packed weights" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "w3"), "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[1] == reference
    assert main(["export", str(run_dir), "--bits", "1-8", "--out", str(tmp_path / "all")]) == 0
    assert main(["eval", str(tmp_path / "all"), "--bits", "3", "--quiet"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["3"]]
    assert rows and rows[0][1] == reference
    assert main(["export", str(run_dir), "--bits", "8", "--format", "onnx", "--calib-size", "16",
                 "--out", str(tmp_path / "onnx")]) == 0
    assert main(["eval", str(tmp_path / "onnx"), "--onnx", "--quiet"]) == 0
    assert "onnx (ONNX Runtime)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--bits", "4", "--bit-map", "x.json"], "not both"),
    ([], "give the precision"),
    (["--bits", "12"], "1..8"),
    (["--bits", "3"], None),   # fine: the sanity case of the table
    (["--bits", "1,2", "--format", "onnx"], "one precision"),
    (["--bit-map", "missing.json"], "no bit map"),
])
def test_cli_export_errors_exit_2_and_write_nothing(run_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    status = main(["export", str(run_dir), *argv, "--out", str(out)])
    if message is None:
        assert status == 0
        return
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_bit_map_that_does_not_fit(run_dir, tmp_path, capsys):
    (tmp_path / "map.json").write_text(json.dumps({"nope": {"w": 4, "a": 4}}))
    assert main(["export", str(run_dir), "--bit-map", str(tmp_path / "map.json"), "--out", str(tmp_path / "o")]) == 2
    assert "does not have" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_packed_export_is_refused_as_input_to_other_commands(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--bits", "4", "--out", str(tmp_path / "w4")]) == 0
    assert main(["ptq", str(tmp_path / "w4"), "--out", str(tmp_path / "q")]) == 2
    assert "packed export" in capsys.readouterr().err
    assert np.isfinite(1.0)
