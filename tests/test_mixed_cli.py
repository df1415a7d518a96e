"""``anybit mixed`` end to end, in-process, on tiny checkpoints and synthetic data."""

from __future__ import annotations

import json

import pytest
import torch

import anybit
from anybit import mixed
from anybit.cli import main
from anybit.models import create

DATA = {"dataset": "synthetic", "options": {"num_samples": 48, "image_size": 16}}


@pytest.fixture(scope="module")
def multibit_run(tmp_path_factory):
    """A width-0.25 ResNet-20 converted for multi-bit use (WBC, shared BN, first/last pinned at 8),
    trained a few steps at 2/4/8 bits on synthetic data, saved with anybit.save."""
    torch.manual_seed(0)
    model = anybit.convert(create("resnet20", width=0.25), anybit.QuantSpec(wbc=True, keep_first_last=8))
    train = anybit.data.load("synthetic", "train", **DATA["options"])
    x = torch.stack([train[i][0] for i in range(len(train))])
    y = train.targets
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for _ in range(3):  # plain SGD by hand (a torch.optim optimizer imports torch._dynamo: slow)
        for p in params:
            p.grad = None
        for b in (8, 4, 2):
            anybit.set_precision(model, b)
            torch.nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.sub_(0.05 * p.grad)
    anybit.set_precision(model, 32)
    path = tmp_path_factory.mktemp("mb") / "run"
    anybit.save(model.eval(), path / "model", data=DATA, bits=[2, 4, 8])
    return path


def test_mixed_cli_end_to_end(multibit_run, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["mixed", str(multibit_run), "--budget", "0.2", "--options", "2,4,8", "--calib-size", "32",
            "--sweep", "0.10:0.20:0.05", "--out", str(out), "--quiet", "--device", "cpu", "--batch-size", "32"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "allocation" in printed and "top-1" in printed
    model = anybit.load(multibit_run)
    bit_map = mixed.load_bit_map(out / "bitmap.json", model)  # what anybit eval --bit-map does
    assert bit_map["conv1"] == (8, 8) and bit_map["fc"] == (8, 8)
    record = json.loads((out / "run.json").read_text())
    alloc = record["metrics"]["allocation"]
    assert alloc["relative_cost"] <= 0.2 and 0 <= alloc["test"]["accuracy"] <= 100
    assert record["config"]["setup"] == "none" and record["config"]["dataset"] == "synthetic"
    assert not record["metrics"]["sensitivity"]["from_cache"]
    for name in ("pareto.csv", "pareto.md", "pareto.png", "sensitivity.json"):
        assert (out / name).is_file(), name
    rows = record["metrics"]["pareto"]["rows"]
    assert {r["method"] for r in rows} == {"uniform", "ip"}
    assert [r["label"] for r in rows if r["method"] == "uniform"] == ["W2A2", "W4A4", "W8A8"]
    assert len(list((out / "bitmaps").glob("*.json"))) == sum(r["method"] == "ip" for r in rows)
    ip_costs = [r["relative_cost"] for r in rows if r["method"] == "ip"]
    assert all(c <= b + 1e-12 for c, b in zip(ip_costs, [r["budget"] for r in rows if r["method"] == "ip"]))

    # The same settings again read the sensitivity from the cache next to the checkpoint.
    out2 = tmp_path / "out2"
    assert main(["mixed", str(multibit_run), "--budget", "0.15", "--options", "2,4,8", "--calib-size", "32",
                 "--metric", "size", "--solver", "greedy", "--out", str(out2), "--quiet", "--batch-size", "32"]) == 0
    record2 = json.loads((out2 / "run.json").read_text())
    assert record2["metrics"]["sensitivity"]["from_cache"]
    assert record2["metrics"]["allocation"]["method"] == "greedy"
    assert (multibit_run / "mixed-cache").is_dir()

    # --candidates: the integer program's best allocations measured, the lowest measured loss kept.
    out3 = tmp_path / "out3"
    assert main(["mixed", str(multibit_run), "--budget", "0.2", "--options", "2,4,8", "--calib-size", "32",
                 "--candidates", "3", "--out", str(out3), "--batch-size", "32"]) == 0
    assert "measured on the calibration data" in capsys.readouterr().out
    alloc3 = json.loads((out3 / "run.json").read_text())["metrics"]["allocation"]
    assert len(alloc3["ranking"]) == 3 and sum(r["chosen"] for r in alloc3["ranking"]) == 1
    assert alloc3["measured_loss"] == min(r["measured_loss"] for r in alloc3["ranking"])
    assert alloc3["relative_cost"] <= 0.2


def test_mixed_cli_errors_exit_2(multibit_run, tmp_path, capsys):
    base = ["mixed", str(multibit_run), "--options", "2,4,8", "--calib-size", "16", "--quiet", "--batch-size", "16"]
    assert main(base + ["--budget", "0.01", "--out", str(tmp_path / "a"), "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert "smallest feasible budget" in err and "anybit mixed: error" in err
    assert main(base + ["--budget", "1.5", "--out", str(tmp_path / "b")]) == 2
    assert "--budget" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "c")]) == 2
    assert "--budget" in capsys.readouterr().err
    assert main(base + ["--budget", "0.2", "--sweep", "0.3:0.1:0.1", "--out", str(tmp_path / "d")]) == 2
    assert main(["mixed", str(tmp_path / "nothing"), "--budget", "0.2", "--out", str(tmp_path / "e")]) == 2
    assert "no anybit checkpoint" in capsys.readouterr().err
    assert main(base + ["--budget", "0.2", "--solver", "greedy", "--candidates", "3", "--out", str(tmp_path / "f")]) == 2
    assert "--candidates" in capsys.readouterr().err
    assert main(base + ["--sweep", "0.2:0.3:0.1", "--candidates", "3", "--out", str(tmp_path / "f")]) == 2
    assert "does not apply to --sweep alone" in capsys.readouterr().err
    # emqnet trained at 32 bits only: its float layers clip their inputs, which a float conversion cannot reproduce
    anybit.save(anybit.load(multibit_run), tmp_path / "float-only" / "model",
                data=anybit.read_metadata(multibit_run)["metadata"]["data"], method="emqnet", bits_trained=[32])
    assert main(["mixed", str(tmp_path / "float-only"), "--budget", "0.2", "--out", str(tmp_path / "g")]) == 2
    assert "--method dedicated --bits 32" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_mixed_cli_run_trained_at_32_bits_is_a_float_checkpoint(multibit_run, tmp_path):
    """mixed.md's float-checkpoint route from the command line: a `train --method dedicated --bits 32` run is
    converted here (per-channel asymmetric weights, first/last pinned) and calibrated per option."""
    anybit.save(anybit.load(multibit_run), tmp_path / "float32" / "model",
                data=anybit.read_metadata(multibit_run)["metadata"]["data"], method="dedicated", bits_trained=[32])
    out = tmp_path / "out"
    assert main(["mixed", str(tmp_path / "float32"), "--budget", "0.5", "--options", "4,8", "--calib-size", "16",
                 "--test-size", "16", "--batch-size", "16", "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["converted_here"] and record["config"]["setup"] == "minmax"


def test_mixed_cli_cache_must_be_a_file_path(multibit_run, tmp_path, capsys):
    for cache in (tmp_path, tmp_path / "missing" / "c.json"):
        assert main(["mixed", str(multibit_run), "--budget", "0.2", "--cache", str(cache),
                     "--out", str(tmp_path / "o")]) == 2
        assert "must be a file path in an existing directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_mixed_cli_float_checkpoint_uses_minmax_calibration(tmp_path):
    """A float checkpoint is converted (per-channel asymmetric, first/last pinned) and calibrated per option."""
    torch.manual_seed(1)
    model = create("resnet20", width=0.25)
    anybit.save(model.eval(), tmp_path / "float" / "model", data=DATA)
    out = tmp_path / "out"
    assert main(["mixed", str(tmp_path / "float"), "--budget", "0.3", "--metric", "bops", "--options", "4,8",
                 "--calib-size", "16", "--test-size", "16", "--batch-size", "16", "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["setup"] == "minmax" and record["config"]["converted_here"]
    assert record["metrics"]["allocation"]["metric"] == "bops"
    assert record["metrics"]["allocation"]["relative_cost"] <= 0.3
