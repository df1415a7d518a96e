"""``anybit ptq`` end to end, in-process, on a tiny registry checkpoint and synthetic data."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import anybit
from anybit.cli import main
from anybit.models import create, register

DATA = {"dataset": "synthetic", "options": {"num_samples": 96, "num_classes": 4, "image_size": 8}}
FAST = ["--calib-size", "64", "--iters", "4", "--bias-iters", "3", "--batch-size", "32", "--quiet"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A width-0.25 ResNet-20 trained a few steps on the synthetic data, saved in float."""
    torch.manual_seed(0)
    model = create("resnet20", width=0.25, num_classes=4)
    train = anybit.data.load("synthetic", "train", **DATA["options"])
    x, y = torch.stack([train[i][0] for i in range(len(train))]), train.targets
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "model"
    anybit.save(model.eval(), path, data=DATA)
    return path


@pytest.mark.parametrize("pipeline, mode", [("rtn", "sequential"), ("mse", "sequential"), ("adaquant", "parallel"),
                                            ("adaquant", "sequential"), ("light", "sequential"),
                                            ("advanced", "sequential")])
def test_pipelines_end_to_end(checkpoint, tmp_path, capsys, pipeline, mode):
    out = tmp_path / "out"
    rc = main(["ptq", str(checkpoint), "--pipeline", pipeline, "--adaquant-mode", mode, "--w-bits", "4",
               "--a-bits", "8", "--out", str(out), *FAST])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "top-1 %" in printed and "W4A8 (first/last 8)" in printed
    run = json.loads((out / "run.json").read_text())
    stages = [s["name"] for s in run["metrics"]["stages"]]
    assert stages[0] == ("ranges_minmax" if pipeline == "rtn" else "ranges_mse")
    assert all(f"stage.{s}" in run["timings_s"] for s in stages)
    layers = run["metrics"]["layers"]
    assert layers["layer1.0.conv1"]["post_op"] == "layer1.0.bn1 + relu"
    assert {"mse_init", "mse_calibrated"} <= set(layers["layer1.0.conv1"])
    if pipeline in ("adaquant", "advanced"):
        adaquant = next(s for s in run["metrics"]["stages"] if s["name"] == "adaquant")["result"]
        assert adaquant["mode"] == mode and len(adaquant["layers"]) == 22  # pinned 8-bit layers too
    meta = anybit.read_metadata(out)
    assert meta["metadata"]["data"] == DATA and meta["metadata"]["ptq"]["pipeline"][0] == stages[0]
    assert meta["metadata"]["ptq"]["w_bits"] == 4
    loaded = anybit.load(out)
    assert anybit.get_precision(loaded)["layer1.0.conv1"] == (4, 8)
    assert anybit.get_precision(loaded)["conv1"] == (8, 8)
    with torch.no_grad():
        acc = anybit.evaluation.evaluate(loaded, anybit.data.make_loader(
            anybit.data.load("synthetic", "test", **DATA["options"]), 256, shuffle=False), quiet=True)["accuracy"]
    assert acc == pytest.approx(run["metrics"]["quantized"]["accuracy"])
    # anybit eval on the PTQ output runs it at the precision it was calibrated at.
    assert main(["eval", str(out), "--quiet", "--batch-size", "256"]) == 0
    evaluated = json.loads((out / "eval" / "run.json").read_text())["metrics"]["bit_map"]
    assert evaluated["accuracy"] == pytest.approx(run["metrics"]["quantized"]["accuracy"])


def test_converted_multibit_checkpoint_is_used_at_32_bits(tmp_path, capsys):
    model = anybit.convert(create("resnet20", width=0.25, num_classes=4), anybit.QuantSpec(wbc=True, keep_first_last=8))
    anybit.set_precision(model, 2)
    anybit.save(model, tmp_path / "mb" / "model", data=DATA)
    rc = main(["ptq", str(tmp_path / "mb"), "--pipeline", "rtn", "--w-bits", "8", "--a-bits", "8",
               "--keep-first-last", "none", "--out", str(tmp_path / "out"), *FAST])
    assert rc == 0
    meta = anybit.read_metadata(tmp_path / "out")
    assert meta["model"]["quant_spec"]["weight"] == "asymmetric" and meta["model"]["quant_spec"]["keep_first_last"] is None
    assert set(map(tuple, meta["precision"].values())) == {(8, 8)}


class _NoLayers(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :4]


register("ptq-test-no-layers", lambda num_classes=4, in_channels=3: _NoLayers())


@pytest.mark.parametrize("extra, message", [
    (["--calib-size", "500"], "larger than the synthetic train split"),
    (["--w-bits", "0"], "--w-bits=0 is not a valid bit-width"),
    (["--a-bits", "17"], "--a-bits=17 is not a valid bit-width"),
    (["--keep-first-last", "33"], "--keep-first-last=33"),
    (["--budget", "0.2", "--pipeline", "mse"], "--budget allocates bits"),
    (["--dataset", "nope"], "unknown dataset"),
])
def test_bad_inputs_exit_2_before_work(checkpoint, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    rc = main(["ptq", str(checkpoint), "--out", str(out), "--quiet", *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_checkpoint_and_model_without_layers_exit_2(tmp_path, capsys):
    assert main(["ptq", str(tmp_path / "nothing"), "--out", str(tmp_path / "o1")]) == 2
    assert "no anybit checkpoint" in capsys.readouterr().err
    model = create("ptq-test-no-layers")
    anybit.save(model, tmp_path / "empty" / "model", data=DATA)
    assert main(["ptq", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")]) == 2
    assert "no layer anybit can quantize" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_existing_output_needs_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["ptq", str(checkpoint), "--out", str(out), "--pipeline", "rtn", *FAST]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite replaces only what anybit wrote: not a directory of the user's own files.
    assert main(["ptq", str(checkpoint), "--out", str(out), "--pipeline", "rtn", "--overwrite", *FAST]) == 2
    assert "not an anybit output directory" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert main(["ptq", str(checkpoint), "--out", str(out), "--pipeline", "rtn", *FAST]) == 0
    assert main(["ptq", str(checkpoint), "--out", str(out), "--pipeline", "rtn", "--overwrite", *FAST]) == 0
    first = (out / "run.json").read_text()
    # A failed --overwrite run puts the previous output back, with nothing half-written.
    assert main(["ptq", str(checkpoint), "--out", str(out), "--pipeline", "light", "--budget", "0.01",
                 "--overwrite", *FAST]) == 2
    assert "smallest feasible budget" in capsys.readouterr().err
    assert (out / "run.json").read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # A failed run into a new directory leaves no directory behind.
    assert main(["ptq", str(checkpoint), "--out", str(tmp_path / "new"), "--pipeline", "light", "--budget", "0.01",
                 *FAST]) == 2
    assert not (tmp_path / "new").exists()


def test_overwrite_refuses_the_current_directory(checkpoint, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        assert main(["ptq", str(checkpoint), "--out", out, "--pipeline", "rtn", "--overwrite", *FAST]) == 2
        assert "current directory" in capsys.readouterr().err
    assert (work / "notes.txt").read_text() == "mine"


def test_budget_run_is_labelled_mixed_and_evaluates_at_its_allocation(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["ptq", str(checkpoint), "--pipeline", "light", "--budget", "0.2", "--out", str(out), *FAST]) == 0
    assert "mixed, 20% of float size" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    saved = anybit.read_metadata(out)["precision"]
    assert len(saved) == 22  # every layer's precision is recorded
    assert main(["eval", str(out), "--quiet", "--batch-size", "256"]) == 0
    evaluated = json.loads((out / "eval" / "run.json").read_text())["metrics"]["bit_map"]
    assert evaluated["accuracy"] == pytest.approx(run["metrics"]["quantized"]["accuracy"])
    assert main(["eval", str(out), "--bits", "4", "--bit-map", str(out / "x.json"), "--quiet"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_output_over_the_input_checkpoint_is_refused(checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for f in checkpoint.parent.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    before = sorted((p.name, p.read_bytes()) for p in run.iterdir())
    for cmd in (["ptq", str(run), "--pipeline", "rtn", *FAST], ["mixed", str(run), "--budget", "0.3", "--quiet"]):
        for out in (run, tmp_path):
            assert main([*cmd, "--out", str(out), "--overwrite"]) == 2
            assert "holds this command's input" in capsys.readouterr().err
    assert sorted((p.name, p.read_bytes()) for p in run.iterdir()) == before


@pytest.mark.parametrize("extra, message", [
    (["--metric", "bops"], "--metric: only for the per-layer allocation of --budget"),
    (["--bit-options", "2,4"], "--bit-options: only for the per-layer allocation of --budget"),
])
def test_allocation_options_without_a_budget_are_refused(checkpoint, tmp_path, capsys, extra, message):
    assert main(["ptq", str(checkpoint), "--pipeline", "light", *extra, "--out", str(tmp_path / "o"), *FAST]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_default_calibration_size_shrinks_to_a_small_split(checkpoint, tmp_path):
    out = tmp_path / "out"
    assert main(["ptq", str(checkpoint), "--pipeline", "rtn", "--batch-size", "32", "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["calib_size"] == 96


def test_eval_guards_its_output_and_checks_channels(checkpoint, tmp_path, capsys):
    ptq_out = tmp_path / "ptq"
    assert main(["ptq", str(checkpoint), "--pipeline", "rtn", "--out", str(ptq_out), *FAST]) == 0
    capsys.readouterr()
    (tmp_path / "file.txt").write_text("mine")
    for out, message in ((checkpoint.parent, "holds this command's input"), (ptq_out, "another anybit command"),
                         (tmp_path / "file.txt", "not a directory")):
        assert main(["eval", str(checkpoint), "--bits", "32", "--quiet", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "file.txt").read_text() == "mine" and (ptq_out / "model.safetensors").is_file()
    assert main(["eval", str(ptq_out), "--quiet", "--out", str(tmp_path / "ev")]) == 0
    assert main(["eval", str(ptq_out), "--quiet", "--out", str(tmp_path / "ev")]) == 0  # its own output: replaced
    assert main(["eval", str(ptq_out), "--quiet", "--data-option", "channels=1"]) == 2
    assert "3-channel images but synthetic has 1 channel" in capsys.readouterr().err


def test_eval_of_a_ptq_checkpoint_at_other_precisions(checkpoint, tmp_path, capsys):
    ptq_out = tmp_path / "ptq"
    assert main(["ptq", str(checkpoint), "--pipeline", "rtn", "--w-bits", "4", "--a-bits", "4", "--out",
                 str(ptq_out), *FAST]) == 0
    capsys.readouterr()
    assert main(["eval", str(ptq_out), "--bits", "8", "--quiet"]) == 2
    assert "no calibrated range at [8] bits" in capsys.readouterr().err
    mixed_out = tmp_path / "mixed"
    assert main(["mixed", str(ptq_out), "--budget", "0.3", "--options", "4,8", "--batch-size", "32", "--quiet",
                 "--out", str(mixed_out)]) == 0
    measured = json.loads((mixed_out / "run.json").read_text())["metrics"]
    assert main(["eval", str(ptq_out), "--bit-map", str(mixed_out / "bitmap.json"), "--quiet"]) == 0
    assert "min/max over 96 training images" in capsys.readouterr().out
    record = json.loads((ptq_out / "eval" / "run.json").read_text())
    assert record["config"]["calibrated"] == {"activation_ranges": "min/max", "samples": 96}
    # the same min/max ranges over the same images as anybit mixed: the same accuracy it measured
    assert record["metrics"]["bit_map"]["accuracy"] == pytest.approx(measured["allocation"]["test"]["accuracy"])


def test_data_options_for_a_checkpoint_that_records_no_dataset(checkpoint, tmp_path):
    bare = tmp_path / "bare" / "model"
    anybit.save(anybit.load(checkpoint), bare)   # saved from Python without data=
    options = [a for key, value in DATA["options"].items() for a in ("--data-option", f"{key}={value}")]
    out = tmp_path / "out"
    assert main(["ptq", str(bare.parent), "--pipeline", "rtn", "--dataset", "synthetic", *options,
                 "--out", str(out), *FAST]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["dataset_options"] == DATA["options"]
