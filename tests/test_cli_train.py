"""``anybit train`` and ``anybit eval`` end to end, in process, on tiny synthetic data."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import anybit
from anybit.cli import main
from anybit.train import MultiBitTrainer

DATA = ["--dataset", "synthetic", "--data-option", "num_samples=96", "--data-option", "channels=1",
        "--data-option", "image_size=8"]


def train_args(out, *extra):
    return ["train", "--model", "resnet20", "--width", "0.5", *DATA, "--bits", "1,4,32", "--epochs", "2",
            "--batch-size", "32", "--out", str(out), "--quiet", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def anyprecision_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "anyprec"
    assert main(train_args(out, "--method", "anyprecision")) == 0
    return out


def test_train_writes_every_output_and_eval_reads_it(anyprecision_run, capsys):
    out = anyprecision_run
    for name in ("model.safetensors", "model.json", "run.json", "log.csv", "accuracy.png", "state/state.json"):
        assert (out / name).is_file(), name
    meta = anybit.read_metadata(out)["metadata"]
    assert meta["data"] == {"dataset": "synthetic", "options": {"num_samples": 96, "channels": 1, "image_size": 8},
                            "train_subset": None}
    assert meta["bits_trained"] == [1, 4, 32] and meta["method"] == "anyprecision"
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["method"] == "anyprecision" and len(run["epochs"]) == 2
    assert set(run["epochs"][0]["bits"]) == {"1", "4", "32"}
    assert run["metrics"]["samples_processed"]["4"]["train"] == 2 * 96
    assert {"train", "eval", "fit", "data"} <= set(run["timings_s"])
    assert len((out / "log.csv").read_text().splitlines()) == 1 + 2 * 3

    capsys.readouterr()
    assert main(["eval", str(out), "--bits", "1-4,32", "--quiet"]) == 2
    assert "--recalibrate-bn" in capsys.readouterr().err
    assert main(["eval", str(out), "--bits", "1-4,32", "--quiet", "--recalibrate-batches", "2"]) == 2
    assert "add --recalibrate-bn or drop it" in capsys.readouterr().err
    assert main(["eval", str(out), "--bit-map", "x.json", "--quiet", "--recalibrate-bn"]) == 2
    assert "not to a --bit-map" in capsys.readouterr().err
    assert main(["eval", str(out), "--bits", "1-4,32", "--quiet", "--recalibrate-bn",
                 "--recalibrate-batches", "2"]) == 0
    printed = capsys.readouterr().out
    assert "BN recal s" in printed and "trained" in printed
    result = json.loads((out / "eval" / "run.json").read_text())
    assert set(result["metrics"]) == {"1", "2", "3", "4", "32"}
    assert result["metrics"]["3"]["trained"] is False and result["metrics"]["3"]["bn_recalibration_s"] > 0
    assert result["bn_recalibration"]["2"]["source"] == 1 and "recalibrate_bn" in result["timings_s"]
    assert (out / "eval" / "accuracy.png").is_file()


def test_emqnet_and_dedicated_evaluate_untrained_bits(tmp_path, capsys):
    for method in ("emqnet", "dedicated"):
        out = tmp_path / method
        assert main(train_args(out, "--method", method, "--epochs", "1", "--bits", "2,32",
                               "--coreset-fraction", "1")) == 0
        assert main(["eval", str(out), "--bits", "2,3,32", "--quiet"]) == 0
        metrics = json.loads((out / "eval" / "run.json").read_text())["metrics"]
        assert set(metrics) == {"2", "3", "32"} and metrics["3"]["bn_recalibration_s"] is None
    emq = tmp_path / "emqnet"
    weights = (emq / "model.safetensors").read_bytes()
    assert main(["eval", str(emq), "--bits", "3,32", "--quiet", "--recalibrate-bn", "--recalibrate-batches", "1"]) == 0
    metrics = json.loads((emq / "eval" / "run.json").read_text())["metrics"]
    assert metrics["3"]["bn_recalibration_s"] > 0 and metrics["32"]["bn_recalibration_s"] > 0
    assert (emq / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "dedicated" / "model-2bit.safetensors").is_file()
    assert "2-bit model" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--bits", ""], "empty"),
    (["--bits", ","], "empty"),
    (["--bits", "2,4,2"], "repeats [2]"),
    (["--bits", "0,4"], "not a valid bit-width"),
    (["--bits", "4,17"], "not a valid bit-width"),
    (["--bits", "64"], "not a valid bit-width"),
    (["--method", "lsq"], "--method 'lsq' is unknown"),
    (["--model", "resnet21"], "unknown model 'resnet21'"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--coreset-fraction", "0"], "argument --coreset-fraction: '0' must be a fraction in (0, 1]"),
    (["--coreset-fraction", "1.2"], "argument --coreset-fraction: '1.2' must be a fraction in (0, 1]"),
    (["--distill", "sideways"], "--distill 'sideways' is unknown"),
])
def test_bad_input_fails_before_any_work(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setattr("anybit.data.load", _must_not_run)
    monkeypatch.setattr(MultiBitTrainer, "fit", _must_not_run)
    out = tmp_path / "run"
    assert main(train_args(out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("extra, flag", [(["--train-subset", "97"], "--train-subset 97"),
                                         (["--test-size", "500"], "--test-subset 500")])
def test_subset_larger_than_the_split_is_an_error(tmp_path, monkeypatch, capsys, extra, flag):
    monkeypatch.setattr(MultiBitTrainer, "fit", _must_not_run)
    out = tmp_path / "run"
    assert main(train_args(out, *extra)) == 2
    err = capsys.readouterr().err
    assert f"{flag} is larger than the synthetic" in err and "use at most" in err and "Traceback" not in err
    assert not out.exists()


def test_existing_output_directory_needs_resume_or_overwrite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr("anybit.data.load", _must_not_run)
    assert main(train_args(out)) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(train_args(out, "--resume")) == 2
    assert "no interrupted run" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_cli_resume_matches_uninterrupted_run(anyprecision_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cut"
    original = MultiBitTrainer._end_epoch

    def interrupt(self, record):
        original(self, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(MultiBitTrainer, "_end_epoch", interrupt)
    assert main(train_args(out, "--method", "anyprecision")) == 130
    monkeypatch.setattr(MultiBitTrainer, "_end_epoch", original)
    assert not (out / "model.safetensors").exists() and (out / "state" / "state.json").is_file()

    assert main(train_args(out, "--method", "anyprecision", "--lr", "0.05", "--resume")) == 2
    assert "lr: saved 0.1, now 0.05" in capsys.readouterr().err

    assert main(train_args(out, "--method", "anyprecision", "--resume")) == 0
    a, b = load_file(str(anyprecision_run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = [json.loads((d / "run.json").read_text())["metrics"]["final"] for d in (anyprecision_run, out)]
    assert [{b: m["accuracy"] for b, m in f.items()} for f in final][0] == {b: m["accuracy"] for b, m in final[1].items()}


def _must_not_run(*args, **kwargs):
    raise AssertionError("work started before the input was validated")


def test_the_last_epoch_line_reports_what_eval_reports_for_the_checkpoint(tmp_path, capsys):
    """emqnet with per-precision BatchNorm statistics: the accuracy the training prints for its last epoch (on its
    fixed test subset) is the accuracy ``anybit eval`` measures on the saved checkpoint with the same subset."""
    out = tmp_path / "emq"
    data = ["--dataset", "synthetic", "--data-option", "num_samples=160", "--data-option", "channels=1",
            "--data-option", "image_size=8"]
    assert main(["train", "--model", "resnet20", "--width", "0.5", *data, "--bits", "1,2,32", "--epochs", "2",
                 "--batch-size", "16", "--coreset-fraction", "0.5", "--test-subset", "64", "--out", str(out),
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    last_line = [line for line in captured.err.splitlines() if line.startswith("epoch 2/2")][-1]
    assert "64 test images" in captured.out
    assert main(["eval", str(out), "--bits", "1,2,32", "--test-subset", "64", "--quiet"]) == 0
    evaluated = json.loads((out / "eval" / "run.json").read_text())["metrics"]
    trained = json.loads((out / "run.json").read_text())["metrics"]["final"]
    for b in ("1", "2", "32"):
        assert trained[b]["accuracy"] == evaluated[b]["accuracy"]
        assert f"{b}b {evaluated[b]['accuracy']:.1f}%" in last_line
