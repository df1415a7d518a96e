"""Scaling: the same ``anybit train`` run in one process and in two (torchrun, gloo), on CPU.

Each run is a real command line: ``python -m anybit train ...`` for one process, ``python -m
torch.distributed.run --standalone --nproc-per-node N -m anybit train ...`` for N, every process with
one torch thread (``OMP_NUM_THREADS=1``). The global batch, seed and settings are the same, so the
processes share each step's batch. Compared: training throughput (images per second through forward and
backward, all bit-widths, from each run's run.json: all ranks' images over the slowest rank's training
time), the wall time of training (``timings_s.fit``: scoring, training, the final BatchNorm pass and the
evaluation at the end), and the test accuracy each run ends with. A run item ``1x1@1`` is one process
with seed 1: the spread between two seeds is the yardstick for the gap between one and two processes.
The machine's load average is recorded before and after every run: on a shared machine it explains the
noise.

    python benchmarks/scale.py --quick      # CPU, Fashion-MNIST: 1 vs 2 processes, 1 with another seed (minutes)
    python benchmarks/scale.py              # CPU, longer runs: 1 process, 2 processes, 1 process with 2 threads
    python benchmarks/scale.py --gpu        # one GPU: anyprecision vs emqnet (coreset) throughput, 5x ResNet-20

Writes benchmarks/results/scale[-<tag>].json (``--gpu``: scale-gpu[-<tag>].json) and docs/benchmarks-scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SRC = ROOT.parent / "src"
sys.path.insert(0, str(ROOT))
from common import (RESULTS, add_training_run_args, command_line, fill_preset, fmt, markdown_table,  # noqa: E402
                    write_markdown, write_results)

TARGET_RATIO = 1.7      # two processes on two cores: at least 1.7x the throughput of one
TARGET_ACC_GAP = 1.0    # points of average test accuracy between the one- and two-process runs

CPU = dict(dataset="fashion-mnist", image_size=28, model="resnet20", width=0.5, bits="1,2,4,8,32", method="emqnet",
           epochs=6, train_subset=10000, test_subset=0, batch_size=64, lr=0.05, device="cpu",
           runs="1x1,2x1,1x2")
QUICK = dict(CPU, epochs=4, train_subset=10000, test_subset=2000, runs="1x1,2x1,1x1@1")
# GPU: 5x ResNet-20 (the paper's model), CIFAR-10 when --data-dir holds it, else synthetic 32x32 images
GPU = dict(dataset="synthetic", image_size=0, model="resnet20", width=5.0, bits="1,2,4,8,32", method="emqnet",
           epochs=2, train_subset=0, test_subset=2000, batch_size=128, lr=0.1, device="cuda",
           runs="anyprecision,emqnet")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short CPU runs (a few minutes)")
    mode.add_argument("--gpu", action="store_true", help="one GPU: anyprecision vs emqnet throughput")
    p.add_argument("--data-dir")
    add_training_run_args(p, "trained bit-widths")
    p.add_argument("--method")
    p.add_argument("--device")
    p.add_argument("--runs", help="CPU: PROCESSESxTHREADS[@SEED] items, e.g. 1x1,2x1,1x2,1x1@1 (default seed: "
                                  "--seed); --gpu: methods")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("--keep", help="keep the run directories under this directory")
    args = p.parse_args(argv)
    fill_preset(args, GPU if args.gpu else QUICK if args.quick else CPU)
    if args.gpu and args.data_dir and args.dataset == "synthetic":
        args.dataset = "cifar10"
    args.mode = "gpu" if args.gpu else "quick" if args.quick else "cpu"
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    return args


def train_argv(args, out: Path, method: str, seed: int) -> list[str]:
    argv = ["train", "--model", args.model, "--width", str(args.width), "--dataset", args.dataset,
            "--bits", args.bits, "--method", method, "--epochs", str(args.epochs), "--batch-size",
            str(args.batch_size), "--lr", str(args.lr), "--seed", str(seed), "--eval-every", "0",
            "--device", args.device, "--quiet", "--out", str(out)]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.image_size:
        argv += ["--data-option", f"image_size={args.image_size}"]
    if args.dataset == "synthetic":
        argv += ["--data-option", f"num_samples={args.train_subset or 10000}"]
    elif args.train_subset:
        argv += ["--train-subset", str(args.train_subset)]
    if args.test_subset:
        argv += ["--test-subset", str(args.test_subset)]
    return argv


def launch(argv: list[str], processes: int, threads: int) -> tuple[list[str], dict]:
    python = [sys.executable]
    if processes > 1:
        python += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    cmd = [*python, "-m", "anybit", *argv]
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(threads)}
    return cmd, env


def run_one(label: str, argv: list[str], processes: int, threads: int, seed: int) -> dict:
    cmd, env = launch(argv, processes, threads)
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    if proc.returncode:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = Path(argv[argv.index("--out") + 1])
    record = json.loads((out / "run.json").read_text())
    t = record["throughput"]
    accuracy = {b: m["accuracy"] for b, m in record["metrics"]["final"].items()}
    return {
        "run": label, "processes": processes, "threads_per_process": threads, "seed": seed,
        "command": " ".join(shlex.quote(c) for c in cmd[1:]), "process_wall_s": wall,
        "fit_s": record["timings_s"]["fit"], "train_images_per_s": t["train_images_per_s"],
        "images_per_s": t["images_per_s"], "phase_s": t["seconds"], "ranks": t["ranks"],
        "accuracy": accuracy, "avg_accuracy": sum(accuracy.values()) / len(accuracy),
        "load_before": load_before, "load_after": load_after,
        "samples": record["metrics"]["samples_processed"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    keep = Path(args.keep) if args.keep else None
    with tempfile.TemporaryDirectory() as tmp:
        base = keep or Path(tmp)
        runs = []
        for item in args.runs:
            seed = args.seed
            if args.gpu:
                method, processes, threads = item, 1, 0
            else:
                shape, _, seed_text = item.partition("@")
                processes, threads = (int(v) for v in shape.split("x"))
                seed = int(seed_text) if seed_text else args.seed
                method = args.method
            label = item if not args.gpu else f"{method} (1 GPU)"
            out = base / item.replace("@", "_seed")
            print(f"running {label} ...", file=sys.stderr, flush=True)
            runs.append(run_one(label, train_argv(args, out, method, seed), processes, threads or os.cpu_count(),
                                seed))
            r = runs[-1]
            print(f"  {r['train_images_per_s']:.1f} images/s, fit {r['fit_s']:.1f} s, avg top-1 "
                  f"{r['avg_accuracy']:.2f} %, load {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}",
                  file=sys.stderr, flush=True)
    ref = runs[0]
    for r in runs:
        r["throughput_ratio"] = r["train_images_per_s"] / ref["train_images_per_s"]
        r["fit_speedup"] = ref["fit_s"] / r["fit_s"]
        r["avg_accuracy_delta"] = r["avg_accuracy"] - ref["avg_accuracy"]
    report = {"benchmark": "scale", "mode": args.mode, "command": command_line(__file__, argv),
              "settings": {k: getattr(args, k) for k in ("dataset", "image_size", "model", "width", "bits", "method",
                                                        "epochs", "train_subset", "test_subset", "batch_size",
                                                        "lr", "device", "seed")},
              "machine": {"cpus": os.cpu_count(), "niceness": os.nice(0)},
              "runs": runs, "verdict": verdict(args, runs), "total_s": time.perf_counter() - started}
    path = write_results("scale-gpu" if args.gpu else "scale", report, args.tag)
    print(table(runs))
    print(f"wrote {path}")
    if not args.no_doc and not args.tag and not args.gpu:   # the page holds the CPU record
        write_markdown("benchmarks-scale.md", doc_lines(report))
    return 0


def verdict(args, runs: list[dict]) -> dict:
    if args.gpu or len(runs) < 2:
        return {"met": None}
    two = next((r for r in runs if r["processes"] == 2 and r["threads_per_process"] == 1), None)
    if two is None:
        return {"met": None}
    ratio, gap = two["throughput_ratio"], two["avg_accuracy_delta"]
    ref = runs[0]
    other_seed = next((r for r in runs[1:] if r["processes"] == ref["processes"]
                       and r["threads_per_process"] == ref["threads_per_process"] and r["seed"] != ref["seed"]), None)
    return {"seed_spread": None if other_seed is None else other_seed["avg_accuracy_delta"],
            "throughput_ratio": ratio, "ratio_target": TARGET_RATIO, "ratio_met": ratio >= TARGET_RATIO,
            "avg_accuracy_delta": gap, "gap_allowed": TARGET_ACC_GAP, "accuracy_met": abs(gap) <= TARGET_ACC_GAP,
            "met": ratio >= TARGET_RATIO and abs(gap) <= TARGET_ACC_GAP}


def table(runs: list[dict]) -> str:
    bits = list(runs[0]["accuracy"])
    headers = ["run", "processes × threads", "seed", "train images/s", "× throughput", "fit s", "× faster (fit)",
               *(f"{b}-bit img/s" for b in bits), "scoring s", "train s", "eval s", "final BN s",
               *(f"{b}-bit %" for b in bits), "avg %", "Δ avg", "load avg (1 min) before → after"]
    rows = []
    for r in runs:
        rows.append([r["run"], f"{r['processes']} × {r['threads_per_process']}", r["seed"],
                     fmt(r["train_images_per_s"], ".1f"),
                     fmt(r["throughput_ratio"]), fmt(r["fit_s"], ".1f"), fmt(r["fit_speedup"]),
                     *(fmt(r["images_per_s"].get(b), ".0f") for b in bits),
                     *(fmt(r["phase_s"][p], ".1f") for p in ("scoring", "train", "eval", "final_bn")),
                     *(fmt(r["accuracy"][b]) for b in bits), fmt(r["avg_accuracy"]),
                     fmt(r["avg_accuracy_delta"], "+.2f"),
                     f"{r['load_before'][0]:.2f} → {r['load_after'][0]:.2f}"])
    return markdown_table(headers, rows)


def doc_lines(report: dict) -> list[str]:
    s, v = report["settings"], report["verdict"]
    lines = ["# Benchmark: one process against two (torchrun, CPU)", "",
             f"Command: `{report['command']}`", "",
             f"Settings: {s['dataset']} ({s['train_subset'] or 'all'} train / {s['test_subset'] or 'all'} test samples), "
             f"{s['model']} width {s['width']}, bits {s['bits']}, method {s['method']} (its defaults), "
             f"{s['epochs']} epochs, global batch {s['batch_size']}, lr {s['lr']}, seed {s['seed']}, device "
             f"{s['device']}; evaluation once, at the end. Every process has one torch thread. Total benchmark time "
             f"{report['total_s'] / 60:.1f} min.", "",
             table(report["runs"]), "",
             "train images/s: images through forward and backward (all bit-widths) per second of training, all "
             "ranks' images over the slowest rank's training time; × throughput: against the first row. fit s: "
             "wall time of training (scoring, training, the final BatchNorm statistics pass, the evaluation at the "
             "end). n-bit img/s: images per second of that precision's forward and backward alone (two processes: "
             "the all-reduce of the step's gradients runs in the last precision's backward, 1 bit, and is counted "
             "there). Phase seconds: the slowest rank's. Accuracy: test top-1 after the last epoch. load avg: the "
             "machine's one-minute load average when the run started and ended.", ""]
    m = report.get("machine", {})
    lines += [f"Machine: {m.get('cpus')} CPU cores, every run at niceness {m.get('niceness')}, shared with other "
              "work at normal priority (the load averages above). Two processes therefore do not get two free "
              "cores: they compete with each other and with that work for the same cores, so the throughput "
              "ratio measures this machine's contention, not how far two processes scale on free cores or GPUs. "
              "The throughput target can only be judged on a machine with a free core per process.", ""]
    if v.get("met") is not None:
        lines += [f"Target (two processes ≥ {v['ratio_target']}× the throughput of one, average accuracy within "
                  f"{v['gap_allowed']:g} point): **{'met' if v['met'] else 'not met'}** — "
                  f"{v['throughput_ratio']:.2f}× ({'met' if v['ratio_met'] else 'not met'}), Δ average "
                  f"{v['avg_accuracy_delta']:+.2f} points ({'met' if v['accuracy_met'] else 'not met'}).", ""]
        if v.get("seed_spread") is not None:
            spread, gap = v["seed_spread"], v["avg_accuracy_delta"]
            lines += [f"Yardstick: one process with another seed ends {spread:+.2f} points from the first row on "
                      f"average. The two-process gap ({gap:+.2f}) is {'within' if abs(gap) <= abs(spread) else 'outside'}"
                      f" that spread; one pair of seeds is a thin measure of the noise.", ""]
    lines += ["The two-process run trains on the same global batches as the one-process run, but its BatchNorm "
              "layers normalise each half-batch with its own statistics and its augmentations come from each "
              "rank's own random stream, so its weights are not the one-process weights (a network without "
              "BatchNorm and augmentation trains the same weights to 1e-7: tests/test_distributed.py).", "",
              "GPU (5× ResNet-20, anyprecision vs emqnet with coreset, one GPU): "
              "`python benchmarks/scale.py --gpu [--data-dir DIR]` — not run (no GPU was available for this record).",
              ""]
    return lines


if __name__ == "__main__":
    sys.exit(main())
