"""The CLI skeleton: help, version, and ``anybit eval`` with good and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import anybit
from anybit.cli import main
from anybit.models import create


@pytest.fixture()
def checkpoint(tmp_path):
    """A converted width-0.25 ResNet-20 for 1-channel synthetic data, ranges initialised at 4 bits."""
    torch.manual_seed(0)
    model = anybit.convert(create("resnet20", width=0.25, in_channels=1), keep_first_last=None)
    data = anybit.data.load("synthetic", "train", channels=1, num_samples=16)
    model.train()
    with anybit.precision(model, 4):
        model(torch.stack([data[i][0] for i in range(16)]))
    path = tmp_path / "run" / "model"
    anybit.save(model, path, data={"dataset": "synthetic", "options": {"channels": 1}})
    return path.parent


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert anybit.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "eval" in capsys.readouterr().out


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "anybit", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and "anybit" in done.stdout


def test_eval_prints_table_and_writes_run_json(checkpoint, capsys):
    assert main(["eval", str(checkpoint), "--bits", "2,4,32", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out
    record = json.loads((checkpoint / "eval" / "run.json").read_text())
    assert set(record["metrics"]) == {"2", "4", "32"}
    for metrics in record["metrics"].values():
        assert 0.0 <= metrics["accuracy"] <= 100.0 and metrics["samples"] == 256
    assert record["config"]["dataset"] == "synthetic"
    assert "torch" in record["environment"]


@pytest.mark.parametrize("bits", ["0", "33", "4,4", "", "a", "8-4"])
def test_eval_rejects_bad_bits(checkpoint, capsys, bits):
    assert main(["eval", str(checkpoint), "--bits", bits]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_eval_missing_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no anybit checkpoint" in capsys.readouterr().err


def test_eval_unknown_dataset(checkpoint, capsys):
    assert main(["eval", str(checkpoint), "--dataset", "imagenet-42"]) == 2
    assert "unknown dataset" in capsys.readouterr().err


@pytest.mark.parametrize("arch, message", [("resnet21", "unknown model 'resnet21'"),
                                           ("resnet32", "does not fit this model")])
def test_eval_checkpoint_whose_recorded_architecture_is_wrong(checkpoint, capsys, arch, message):
    sidecar = checkpoint / "model.json"
    meta = json.loads(sidecar.read_text())
    meta["model"]["arch"] = arch
    sidecar.write_text(json.dumps(meta))
    assert main(["eval", str(checkpoint)]) == 2
    assert message in capsys.readouterr().err


def test_eval_corrupt_checkpoint(checkpoint, capsys):
    (checkpoint / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["eval", str(checkpoint)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "anybit", "eval", str(tmp_path / "x"), "--bits", "33"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "bit-width=33" in done.stderr


def test_eval_bit_map_matches_uniform_precision(checkpoint, tmp_path, capsys):
    model = anybit.load(checkpoint)
    bitmap = tmp_path / "bitmap.json"
    bitmap.write_text(json.dumps({name: {"w": 4, "a": 4} for name in anybit.get_precision(model)}))
    assert main(["eval", str(checkpoint), "--bits", "4", "--quiet", "--out", str(tmp_path / "uniform")]) == 0
    uniform = json.loads((tmp_path / "uniform" / "run.json").read_text())["metrics"]["4"]
    assert main(["eval", str(checkpoint), "--bit-map", str(bitmap), "--quiet", "--out", str(tmp_path / "map")]) == 0
    mapped = json.loads((tmp_path / "map" / "run.json").read_text())["metrics"]["bit_map"]
    assert mapped["accuracy"] == uniform["accuracy"] and mapped["loss"] == pytest.approx(uniform["loss"])
    bitmap.write_text(json.dumps({"no.such.layer": {"w": 4, "a": 4}}))
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--bit-map", str(bitmap)]) == 2
    assert "no.such.layer" in capsys.readouterr().err
