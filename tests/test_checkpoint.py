"""Checkpoints: exact round trips, user-provided models, corrupt/missing files, wrong
architectures, atomic writes and a pickle-free format."""

from __future__ import annotations

import json
import os
import re
import struct

import pytest
import torch
import torchvision
from safetensors import safe_open

import anybit
from anybit.quant import PrecisionNotTrainedError
from anybit.checkpoint import CheckpointError, CheckpointNotFoundError, checkpoint_paths
from anybit.models import create
from anybit.quant import ActQuantizer, SwitchableBatchNorm


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _trained_resnet20():
    """resnet20 (registry) with WBC, switchable BN, pinned ends, learned act ranges, per-bit
    calibrated act and weight ranges, non-default BN statistics, at 4 bits."""
    model = create("resnet20", width=0.25, num_classes=7)
    anybit.convert(model, wbc=True, bn="switchable", bn_bits=(1, 2, 4, 8, 32), keep_first_last=8)
    x = torch.randn(4, 3, 8, 8)
    model.train()
    with torch.no_grad():
        for bits in (8, 4, 2):  # learned ranges start at the first batch; BN statistics move
            anybit.set_precision(model, bits)
            model(x)
    model.layer1[0].conv2.input_quant.set_range(4, torch.tensor(-0.5), torch.tensor(1.25))
    model.layer2[0].conv1.input_quant.set_range(2, torch.tensor(0.0), torch.tensor(0.75), learnable=False)
    model.layer3[0].conv1.weight_quant.set_range(4, torch.full((16,), 0.05), torch.full((16,), 8.0))
    anybit.set_precision(model, 4)
    anybit.set_precision(model, {"layer1.1.conv1": 4})  # a per-layer call that keeps the model uniform
    return model.eval(), x


def test_round_trip_reproduces_outputs_exactly(tmp_path):
    model, x = _trained_resnet20()
    with torch.no_grad():
        expected = {b: None for b in (4, 2, 8)}
        expected[4] = model(x)
        for b in (2, 8):
            with anybit.precision(model, b):
                expected[b] = model(x)
    path = anybit.save(model, tmp_path / "ck", epoch=3, bits=[1, 2, 4, 8, 32])
    assert path == tmp_path / "ck.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]  # no .tmp left

    loaded = anybit.load(tmp_path / "ck").eval()  # a rebuilt model starts in training mode, as in PyTorch
    assert loaded is not model
    assert anybit.get_precision(loaded) == anybit.get_precision(model)
    assert anybit.get_precision(loaded)["conv1"] == (8, 8) and loaded.conv1.pinned == (8, 8)
    assert loaded.layer1[0].conv1.wbc and isinstance(loaded.bn1, SwitchableBatchNorm)
    assert loaded.bn1.active == "4"
    assert loaded.layer1[0].conv2.input_quant.calibrated_bits() == [4]
    assert loaded.layer3[0].conv1.weight_quant.calibrated_bits() == [4]
    assert bool(loaded.layer1[0].conv1.input_quant.initialized)
    assert loaded.fc.out_features == 7
    with torch.no_grad():
        assert torch.equal(loaded(x), expected[4])
        for b in (2, 8):
            with anybit.precision(loaded, b):
                assert torch.equal(loaded(x), expected[b])
    assert loaded.anybit_meta["checkpoint"] == {"epoch": 3, "bits": [1, 2, 4, 8, 32]}
    assert loaded.anybit_meta["arch"] == "resnet20"
    meta = anybit.read_metadata(tmp_path / "ck.json")
    assert meta["metadata"]["epoch"] == 3 and meta["model"]["arch_kwargs"] == {"width": 0.25, "num_classes": 7}


def test_files_are_plain_safetensors_and_json(tmp_path):
    model, _ = _trained_resnet20()
    anybit.save(model, tmp_path / "run")  # also accepts a directory-less stem; the path may not exist yet
    tensors, sidecar = checkpoint_paths(tmp_path / "run")
    raw = tensors.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    assert header["__metadata__"]["format"] == "anybit-checkpoint"
    assert "conv1.weight" in header and "bn1.bns.4.running_mean" in header
    assert not raw.startswith(b"PK") and b"\x80\x02" not in raw[:2]  # not a zip/pickle torch file
    with safe_open(str(tensors), "pt") as f:
        assert "layer1.0.conv2.input_quant.ranges.b4_lo" in set(f.keys())
    data = json.loads(sidecar.read_text())
    assert data["format"] == "anybit-checkpoint" and data["format_version"] == 1
    assert data["model"]["quant_spec"]["bn"] == "switchable"
    assert data["precision"]["layer1.0.conv1"] == [4, 4]
    mask = os.umask(0o022)
    os.umask(mask)
    for path in (tensors, sidecar):   # an ordinary file's mode, not the temporary file's private 0600
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_path_forms(tmp_path):
    model = create("resnet20", width=0.25)
    anybit.convert(model)
    anybit.save(model, tmp_path / "d" / "m.safetensors")
    assert (tmp_path / "d" / "m.json").is_file()
    for form in ("d/m", "d/m.json", "d/m.safetensors"):
        assert isinstance(anybit.load(tmp_path / form).conv1, anybit.quant.QuantConv2d)
    (tmp_path / "dir").mkdir()
    anybit.save(model, tmp_path / "dir")  # a directory: dir/model.*
    assert (tmp_path / "dir" / "model.safetensors").is_file()
    anybit.load(tmp_path / "dir")


def test_load_into_user_torchvision_model(tmp_path):
    model = torchvision.models.squeezenet1_1(num_classes=5)
    anybit.convert(model, weight="symmetric", keep_first_last=8)
    x = torch.randn(1, 3, 48, 48)
    model.eval()
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.init_range(-4.0, 4.0)
    anybit.set_precision(model, 6)
    with torch.no_grad():
        expected = model(x)
    anybit.save(model, tmp_path / "tv")
    with pytest.raises(CheckpointError, match="model="):  # not a registry model: say how to load it
        anybit.load(tmp_path / "tv")
    fresh = torchvision.models.squeezenet1_1(num_classes=5)
    loaded = anybit.load(tmp_path / "tv", model=fresh)
    assert loaded is fresh and loaded.features[0].weight_quant.method == "symmetric"
    assert anybit.get_precision(loaded) == anybit.get_precision(model)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nothing_here") as info:
        anybit.load(tmp_path / "nothing_here")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, CheckpointError)
    model = create("resnet20", width=0.25)
    anybit.convert(model)
    anybit.save(model, tmp_path / "half")
    (tmp_path / "half.json").unlink()  # one file alone is not a checkpoint
    with pytest.raises(FileNotFoundError, match="half.json"):
        anybit.read_metadata(tmp_path / "half")


def _saved(tmp_path, name="m"):
    model = create("resnet20", width=0.25)
    anybit.convert(model)
    anybit.save(model, tmp_path / name)
    return tmp_path / name


def test_corrupt_tensors(tmp_path):
    path = _saved(tmp_path)
    tensors = tmp_path / "m.safetensors"
    tensors.write_bytes(b"\x00\x01garbage, not safetensors" * 3)
    with pytest.raises(CheckpointError, match="safetensors"):
        anybit.load(path)
    good = (_saved(tmp_path, "t").with_suffix(".safetensors")).read_bytes()
    tensors.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CheckpointError):
        anybit.load(path)


def test_corrupt_or_foreign_sidecar(tmp_path):
    path = _saved(tmp_path)
    sidecar = tmp_path / "m.json"
    sidecar.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        anybit.load(path)
    sidecar.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError):
        anybit.load(path)
    sidecar.write_text(json.dumps([1, 2, 3]))
    with pytest.raises(CheckpointError, match="not an anybit checkpoint"):
        anybit.load(path)
    sidecar.write_text(json.dumps({"format": "anybit-checkpoint", "format_version": 99}))
    with pytest.raises(CheckpointError, match="upgrade"):
        anybit.read_metadata(path)


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["precision"].update({next(iter(d["precision"])): "abc"}), "'precision."),
    (lambda d: d["model"].update(quant_spec="bogus"), "'model.quant_spec'"),
    (lambda d: d["model"].update(arch_kwargs="big"), "'model.arch_kwargs'"),
    (lambda d: d.update(metadata={"data": {"dataset": "synthetic", "options": "x"}}), "'metadata.data'"),
    (lambda d: d.update(metadata={"method": ["a"]}), "'metadata.method'"),
    (lambda d: d.update(precision=[1, 2]), "'precision'"),
])
def test_hand_edited_sidecar_with_wrong_types_is_a_clear_error(tmp_path, edit, field):
    path = _saved(tmp_path)
    sidecar = tmp_path / "m.json"
    data = json.loads(sidecar.read_text())
    assert data["precision"] and "quant_spec" in data["model"]
    edit(data)
    sidecar.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"is corrupt: {re.escape(field)}"):
        anybit.load(path)


@pytest.mark.parametrize("other", [dict(name="resnet32"), dict(name="resnet20", width=2)])
def test_wrong_architecture(tmp_path, other):
    path = _saved(tmp_path)  # resnet20, width 0.25
    target = create(other.pop("name"), **{"width": 0.25, **other})
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match="resnet20") as info:
        anybit.load(path, model=target)
    assert "does not fit" in str(info.value)
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # no tensor was half-loaded


def test_no_tmp_files_even_when_writing_fails(tmp_path, monkeypatch):
    import anybit.checkpoint as ck

    model = create("resnet20", width=0.25)
    anybit.convert(model)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        anybit.save(model, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_float_model_round_trip(tmp_path):
    model = create("resnet20", width=0.25).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    anybit.save(model, tmp_path / "f")
    loaded = anybit.load(tmp_path / "f").eval()
    assert not any(isinstance(m, anybit.quant.QuantConv2d) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_switchable_bn_without_float_key_round_trip(tmp_path):
    # bn_bits without 32: float precision has no BN of its own and says so instead of borrowing
    # another precision's; at a trained precision the checkpoint restores the active BN
    model = create("resnet20", width=0.25)
    anybit.convert(model, bn="switchable", bn_bits=(2, 4), keep_first_last=None)
    model.eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(PrecisionNotTrainedError, match="'32'"):
        model(x)
    anybit.set_precision(model, 4)
    anybit.calibrate_activations(model, [x])
    with torch.no_grad():
        model.bn1.bns["4"].bias.fill_(0.5)
        expected = model(x)
    anybit.save(model, tmp_path / "sw")
    loaded = anybit.load(tmp_path / "sw").eval()
    assert loaded.bn1.active == "4" and set(anybit.get_precision(loaded).values()) == {(4, 4)}
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
