"""Two processes on CPU (gloo), started by torch.distributed's own launcher (``python -m torch.distributed.run``,
i.e. torchrun), against one process with the same global batch and seed.

Tolerance: the weights of the two-process run equal the one-process run's within ``atol=1e-5, rtol=1e-4``
(measured: under 1e-7; the only difference is the order in which gradients are summed). The network has
no BatchNorm: with BatchNorm each process normalises with its own half-batch's statistics, which is
standard data-parallel practice and makes the weights differ by design. The coreset subsets (sharded
scoring, scores gathered) must be identical, and a resumed two-process run must equal the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import anybit.models.registry

sys.path.insert(0, str(Path(__file__).parent))
import dist_driver  # noqa: E402


@pytest.fixture(autouse=True)
def tiny_model_registered():
    """The BatchNorm-free test network, under the name the commands use (the subprocesses register it too)."""
    dist_driver.register()
    yield
    anybit.models.registry._REGISTRY.pop("tiny-nobn", None)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

SRC = Path(__file__).resolve().parents[1] / "src"
DRIVER = Path(__file__).resolve().parent / "dist_driver.py"
DATA = ["--dataset", "synthetic", "--data-option", "num_samples=256", "--data-option", "image_size=16"]
COMMON = [*DATA, "--model", "tiny-nobn", "--batch-size", "32", "--bits", "2,4,32", "--eval-every", "0",
          "--quiet", "--device", "cpu", "--lr", "0.05"]
RUNS = {
    # el2n scores refreshed every epoch: each rank scores its part, the subsets depend on the gathered scores
    "emqnet": ["train", *COMMON, "--method", "emqnet", "--epochs", "3", "--coreset-score", "el2n",
               "--coreset-warmup", "1", "--coreset-refresh", "1", "--coreset-fraction", "0.3"],
    # full data, recursive distillation (teachers on the same batch)
    "anyprecision": ["train", *COMMON, "--method", "anyprecision", "--epochs", "2"],
    # one network (one DistributedDataParallel) per bit-width
    "dedicated": ["train", *COMMON, "--method", "dedicated", "--epochs", "2", "--bits", "2,32"],
}
BN_RUN = ["train", *DATA, "--model", "resnet20", "--width", "0.25", "--batch-size", "32", "--bits", "2,32",
          "--epochs", "2", "--eval-every", "1", "--final-bn-batches", "3", "--quiet", "--device", "cpu"]
MIXED = ["--budget", "0.5", "--options", "2,8", "--candidates", "3", "--calib-size", "64", "--test-subset", "64",
         "--batch-size", "16", "--no-cache", "--quiet", "--device", "cpu"]


def torchrun(commands: list[list[str]], *extra: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--monitor-interval", "0.5", str(DRIVER), json.dumps(commands), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


def with_out(argv: list[str], out: Path) -> list[str]:
    return [*argv, "--out", str(out)]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """One torchrun job running every command of RUNS, a BatchNorm network, the mixed-precision allocation of
    that network, a command whose rank 1 was started with another learning rate, and one whose output
    directory rank 0 refuses (both must fail on every rank)."""
    root = tmp_path_factory.mktemp("dist")
    commands = [with_out(argv, root / name) for name, argv in RUNS.items()]
    commands.append(with_out(BN_RUN, root / "bn"))
    commands.append(with_out(["mixed", str(root / "bn"), *MIXED], root / "mixed"))
    commands.append(with_out(RUNS["dedicated"], root / "disagree"))
    commands.append(with_out(RUNS["dedicated"], root / "dedicated"))       # exists: rank 0 refuses it
    proc, seconds = torchrun(commands, "--rank-args", "1", str(len(commands) - 2), '["--lr", "0.2"]')
    return root, proc, seconds


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_train_the_same_weights_as_one(two_process_runs, tmp_path, name):
    root, proc, _ = two_process_runs
    assert (root / name / "model.safetensors").is_file(), proc.stderr[-3000:]
    from anybit.cli import main

    assert main(with_out(RUNS[name], tmp_path / "one")) == 0
    assert_same_weights(weights(tmp_path / "one"), weights(root / name))
    one, two = run_json(tmp_path / "one"), run_json(root / name)
    # identical subsets every epoch (for emqnet they come from the gathered el2n scores)
    assert [e["subsets"] for e in one["epochs"]] == [e["subsets"] for e in two["epochs"]]
    for e1, e2 in zip(one["epochs"], two["epochs"]):
        for b in e1["bits"]:   # metrics reduced over the ranks: every sample counted once
            assert e2["bits"][b]["samples"] == e1["bits"][b]["samples"]
            assert e2["bits"][b]["loss"] == pytest.approx(e1["bits"][b]["loss"], rel=1e-4, abs=1e-5)
    assert two["distributed"]["world_size"] == 2 and two["distributed"]["backend"] == "gloo"
    ranks = two["throughput"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["images_per_s"][b] > 0 for r in ranks for b in r["images_per_s"])
    if name == "emqnet":
        scored = two["epochs"][1]["scoring"]
        assert scored["samples_per_bits"]["2"] == 256 and scored["per_bits"]["2"]["samples"] == 128
        assert ranks[0]["seconds"]["scoring"] > 0 and ranks[1]["seconds"]["scoring"] > 0


def test_batchnorm_network_ends_with_one_process_statistics(two_process_runs):
    """With BatchNorm the weights differ from one process (per-rank batch statistics), but the final statistics
    pass gives every rank the statistics a one-process pass computes on the trained weights."""
    root, proc, _ = two_process_runs
    out = root / "bn"
    assert (out / "model.safetensors").is_file(), proc.stderr[-3000:]
    import anybit
    from anybit import data
    from anybit.train import reestimate_bn

    model = anybit.load(out)
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    train = data.load("synthetic", "train", num_samples=256, image_size=16)
    loader = data.make_loader(train, 32, shuffle=True, seed=0)
    reestimate_bn(model, loader, [32, 2], batches=3)
    again = {k: v for k, v in model.state_dict().items() if "running_" in k}
    assert saved.keys() == again.keys() and any(k.endswith("running_mean_2") for k in saved)
    for key in saved:
        torch.testing.assert_close(again[key], saved[key], atol=1e-5, rtol=1e-4, msg=key)
    record = run_json(out)
    assert record["epochs"][-1]["bits"]["2"]["test_acc"] is not None
    steps = sum(e["steps"] for e in record["epochs"])
    assert record["metrics"]["samples_processed"]["2"]["train"] == steps * 32   # the global batch, once


def test_mixed_sensitivity_shared_by_two_processes_is_one_process_sensitivity(two_process_runs, tmp_path):
    root, proc, _ = two_process_runs
    assert (root / "mixed" / "bitmap.json").is_file(), proc.stderr[-3000:]
    from anybit.cli import main

    assert main(with_out(["mixed", str(root / "bn"), *MIXED], tmp_path / "one")) == 0
    one, two = (json.loads((d / "sensitivity.json").read_text()) for d in (tmp_path / "one", root / "mixed"))
    assert one["layers"] == two["layers"]
    assert torch.allclose(torch.tensor(one["delta"]), torch.tensor(two["delta"]), rtol=1e-9, atol=1e-12)
    assert json.loads((tmp_path / "one" / "bitmap.json").read_text()) == \
        json.loads((root / "mixed" / "bitmap.json").read_text())
    ranked = [[r["measured_loss"] for r in run_json(d)["metrics"]["allocation"]["ranking"]]
              for d in (tmp_path / "one", root / "mixed")]
    assert ranked[0] == pytest.approx(ranked[1], rel=1e-9)   # candidates measured on half the batches each
    assert run_json(root / "mixed")["config"]["processes"] == 2


def test_ranks_that_disagree_on_settings_all_stop(two_process_runs):
    root, proc, _ = two_process_runs
    assert proc.returncode != 0
    assert "the ranks disagree on the training settings" in proc.stderr
    assert "lr: rank 0 0.05, rank 1 0.2" in proc.stderr
    assert not (root / "disagree").exists()        # nothing written, the partial output removed


def test_a_set_up_error_on_one_rank_stops_every_rank(two_process_runs):
    root, proc, _ = two_process_runs
    refused = f"output directory {root / 'dedicated'} already exists and is not empty"
    assert f"anybit train: error: {refused}" in proc.stderr                                   # rank 0
    assert f"anybit train: error: rank 0 failed during the set-up: {refused}" in proc.stderr  # rank 1
    assert (root / "dedicated" / "model.safetensors").is_file()     # the earlier run's output untouched


def test_a_failing_rank_stops_the_job_and_the_run_resumes(two_process_runs, tmp_path):
    root, _, _ = two_process_runs
    argv = with_out(RUNS["emqnet"], tmp_path / "run")
    proc, _ = torchrun([argv], "--fail", "1:2")       # rank 1 crashes when epoch 3 starts
    ended = time.time()
    assert proc.returncode != 0
    assert "injected failure on rank 1 at epoch 3" in proc.stderr
    failed = float(re.search(r"failing at ([0-9.]+)", proc.stderr).group(1))
    assert ended - failed < 30, f"the job took {ended - failed:.0f} s to stop after rank 1 failed"
    state = json.loads((tmp_path / "run" / "state" / "state.json").read_text())
    # rank 0 was stopped during epoch 3, or while it saved epoch 2's state (saved atomically: 1 or 2 then)
    assert state["epoch"] in (1, 2) and not (tmp_path / "run" / "model.safetensors").exists()

    proc, _ = torchrun([argv + ["--resume"]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the resumed run is the uninterrupted one
    assert_same_weights(weights(tmp_path / "run"), weights(root / "emqnet"))
    resumed, whole = run_json(tmp_path / "run"), run_json(root / "emqnet")
    assert [e["subsets"] for e in resumed["epochs"]] == [e["subsets"] for e in whole["epochs"]]
    assert len(resumed["throughput"]["ranks"]) == 2


def test_a_divergence_one_rank_sees_stops_every_rank_at_the_same_step(tmp_path):
    argv = with_out(RUNS["dedicated"], tmp_path / "run")
    proc, _ = torchrun([argv], "--nan", "1:1")        # rank 1's losses are NaN from epoch 2 on
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "training diverged" in line]
    assert len(lines) == 2, proc.stderr[-3000:]        # one line from each rank, at the same step
    assert all("in epoch 2, step 1 " in line for line in lines)
    assert any("became nan" in line for line in lines)                             # rank 1
    assert any("became non-finite on another process" in line for line in lines)   # rank 0
    state = json.loads((tmp_path / "run" / "state" / "state.json").read_text())
    assert state["epoch"] == 1 and not (tmp_path / "run" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- one process


def test_ranks_batches_together_are_the_one_process_batches():
    from anybit.data import load
    from anybit.train.trainer import _StepBatches

    data = load("synthetic", "train", num_samples=40, image_size=4)
    for plan, batch in (({4: None, 2: None}, 8), ({4: torch.randperm(40)[:22], 2: torch.randperm(40)[:22]}, 8),
                        ({4: torch.arange(5)}, 8)):
        one = [{b: t[2] for b, t in step.items()} for step in _StepBatches(data, plan, batch, 0, 3, torch.device("cpu"), 0)]
        parts = [[{b: t[2] for b, t in step.items()} for step in
                  _StepBatches(data, plan, batch, 0, 3, torch.device("cpu"), 0, rank, 2)] for rank in range(2)]
        assert len(parts[0]) == len(parts[1]) == len(one)
        for k, step in enumerate(one):
            for b in step:
                together = torch.cat([parts[0][k][b], parts[1][k][b]])
                assert parts[0][k][b].numel() == parts[1][k][b].numel()
                if step[b].numel() % 2 == 0:
                    assert sorted(together.tolist()) == sorted(step[b].tolist())
                else:   # a short odd batch is wrapped around: every rank gets as many samples
                    assert set(together.tolist()) == set(step[b].tolist())


def test_one_rank_context_collectives_return_their_input():
    from anybit.train.distributed import DistContext, init_distributed

    ctx = init_distributed("cpu")
    assert not ctx.enabled and ctx.is_main and ctx.device == torch.device("cpu")
    t = torch.arange(3.0)
    assert ctx.all_reduce_(t, "mean") is t and ctx.gather_chunks(t) is t
    assert ctx.all_gather_object({"a": 1}) == [{"a": 1}] and ctx.broadcast_object(5) == 5
    ctx.check_same({"x": 1}, "anything")
    ctx.barrier()
    with pytest.raises(KeyError):
        with ctx.agreed("a block"):
            raise KeyError("mine")
    assert ctx.shard(5).tolist() == [0, 1, 2, 3, 4]


def test_bf16_autocast_runs_only_the_low_bit_passes():
    from anybit.train import MultiBitStep, TrainConfig, prepare_model

    model = prepare_model(dist_driver.TinyNoBN(in_channels=1), TrainConfig(bits=(2, 4, 8, 32)))
    seen = []
    model.conv2.register_forward_hook(lambda m, i, o: seen.append((m.w_bits, o.dtype)))
    step = MultiBitStep(model, (2, 4, 8, 32), amp="bf16")
    step(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert dict(seen) == {32: torch.float32, 8: torch.float32, 4: torch.bfloat16, 2: torch.bfloat16}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("bits, bound", [(2, 0.01), (4, 0.03), (8, 0.5)])
def test_bf16_moves_a_grid_level_by_a_bounded_share_of_a_step(bits, bound):
    """What docs/distributed.md says about bf16 and the k-bit activation grid on [0, 1]."""
    levels = torch.arange(2**bits, dtype=torch.float32) / (2**bits - 1)
    moved = (levels.bfloat16().float() - levels).abs().max() * (2**bits - 1)
    assert moved <= bound
    assert torch.unique(levels.bfloat16()).numel() == levels.numel()


def test_single_process_run_records_throughput_and_auto_workers(tmp_path):
    from anybit.cli import main
    from anybit.cli.distributed import auto_workers

    assert auto_workers("fashion-mnist") == 0 and auto_workers("imagefolder") >= 1
    assert main(with_out(RUNS["anyprecision"], tmp_path / "one")) == 0
    run = run_json(tmp_path / "one")
    t = run["throughput"]
    assert t["world_size"] == 1 and len(t["ranks"]) == 1 and t["ranks"][0]["rank"] == 0
    assert set(t["images_per_s"]) == {"32", "4", "2"} and t["train_images_per_s"] > 0
    assert t["seconds"]["train"] > 0
    assert run["config"]["num_workers"] == 0 and run["distributed"]["world_size"] == 1


@pytest.mark.parametrize("extra, message", [
    (["--dist-timeout", "0"], "argument --dist-timeout: '0' must be a positive number"),
    (["--dist-timeout", "inf"], "argument --dist-timeout: 'inf' is not a finite number"),
    (["--amp", "fp8"], "invalid choice"),
    (["--workers", "some"], "is not 'auto' or a number"),
])
def test_bad_distributed_options_are_refused(tmp_path, capsys, extra, message):
    from anybit.cli import main

    assert main(with_out(RUNS["dedicated"], tmp_path / "x") + extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_state_saved_before_amp_existed_resumes():
    from anybit.train import check_same_config

    check_same_config({"lr": 0.1, "sampler": {"sampler": "full"}}, {"lr": 0.1, "amp": "off", "sampler": {"sampler": "full"}})


def test_one_process_commands_refuse_to_start_under_torchrun(monkeypatch, capsys):
    from anybit.cli import main

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    assert main(["eval", "no-such-run"]) == 2
    assert "anybit eval runs in one process: start it without torchrun" in capsys.readouterr().err
