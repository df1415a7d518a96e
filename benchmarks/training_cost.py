"""Training cost of emqnet's default recipe against Any-Precision, at the accuracy each reaches.

Every run trains the same model for the same bit-widths from the same seed; the wall-clock time of
``MultiBitTrainer.fit()`` (scoring, sampling, data loading, training and the final BatchNorm statistics
pass; no evaluation) is compared with the ``anyprecision`` run (full data, one BatchNorm per bit-width,
run without distillation: its most accurate setting here, see the ``anyprecision-recursive`` row). One
float model (``dedicated-32``) gives the cost of training a single network. emqnet runs use
``TrainConfig(method="emqnet")``'s defaults; only the shared settings below are given. Accuracy is
measured afterwards on the test set: the trained bit-widths, and the untrained 3, 5 and 6 bits (emqnet
with each rule for deriving BatchNorm statistics, no data; anyprecision after BN re-calibration).

    python benchmarks/training_cost.py --quick     # CPU, Fashion-MNIST, about 40 minutes on 2 idle cores
    python benchmarks/training_cost.py --long      # CPU, nearer convergence, under an hour (anyprecision, one float model, emqnet)
    python benchmarks/training_cost.py --full --data-dir DIR --device cuda   # CIFAR-10, 5x width, 200 epochs

Writes benchmarks/results/training_cost[-<tag>].json and the table to docs/benchmarks-training-cost.md
(or docs/benchmarks-training-cost-<tag>.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import anybit
import anybit.data
from anybit.evaluation import evaluate
from anybit.models import create
from anybit.quant import PRECISION_BN_TYPES, UNTRAINED_RULES
from anybit.report import environment, format_table
from anybit.train import MultiBitTrainer, TrainConfig, recalibrate_bn
from common import add_training_run_args, command_line, fill_preset, load_data, write_json  # benchmarks/common.py

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DOCS = ROOT.parent / "docs"
TARGET_SPEEDUP = 4.0
TARGET_AVG_GAP = 1.0     # points of average accuracy over the trained bit-widths
TARGET_BIT_GAP = 2.0     # points at any trained bit-width
UNTRAINED = (3, 5, 6)

# name: (description, method, settings beyond the shared ones; "epochs_x" scales the emqnet epochs)
RUNS = {
    "anyprecision": ("full data, one BatchNorm per bit-width, no distillation (reference)", "anyprecision",
                     {"distill": "none"}),
    "anyprecision-recursive": ("anyprecision with its own recursive distillation", "anyprecision", {}),
    "dedicated-32": ("one float model, full data: the cost of training one network", "dedicated", {"bits": (32,)}),
    "emqnet": ("the default recipe, at --emqnet-epochs", "emqnet", {}),
    "emqnet-equal-epochs": ("the default recipe at anyprecision's epochs", "emqnet", {"epochs_x": 0}),
    "emqnet-2x": ("the default recipe at twice anyprecision's epochs", "emqnet", {"epochs_x": 2}),
    "emqnet-single-set": ("one set of BatchNorm statistics for every bit-width", "emqnet", {"bn_stats": "shared"}),
    "emqnet-el2n": ("bit-wise EL2N scores instead of uniform subsets", "emqnet", {"coreset_score": "el2n"}),
    "emqnet-distill": ("from-top distillation through the teachers' logit memory", "emqnet",
                       {"distill": "from-top"}),
    "emqnet-full-steps": ("as many steps per epoch as full data (smaller per-bit batches)", "emqnet",
                          {"coreset_steps": "full"}),
    "emqnet-lr-x2": ("twice the learning rate (fewer steps per epoch)", "emqnet", {"lr_x": 2}),
}
DEFAULT_RUNS = ("anyprecision", "anyprecision-recursive", "dedicated-32", "emqnet", "emqnet-equal-epochs", "emqnet-2x", "emqnet-single-set",
                "emqnet-el2n", "emqnet-distill", "emqnet-full-steps", "emqnet-lr-x2")

QUICK = dict(dataset="fashion-mnist", image_size=28, model="resnet20", width=0.5, bits="1,2,4,8,32", epochs=10,
             emqnet_epochs=12, train_subset=5000, test_subset=2000, batch_size=32, lr=0.05, device="cpu",
             threads=1, runs=",".join(DEFAULT_RUNS))
LONG = dict(QUICK, epochs=15, emqnet_epochs=18, train_subset=10000, test_subset=5000,
            runs="anyprecision,dedicated-32,emqnet")
FULL = dict(dataset="cifar10", image_size=0, model="resnet20", width=5.0, bits="1,2,4,8,32", epochs=200,
            emqnet_epochs=240, train_subset=0, test_subset=0, batch_size=128, lr=0.1, device="cuda", threads=0,
            runs="anyprecision,anyprecision-recursive,dedicated-32,emqnet,emqnet-equal-epochs")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small CPU run (the default settings)")
    mode.add_argument("--long", action="store_true", help="a longer CPU run, nearer convergence (under an hour)")
    mode.add_argument("--full", action="store_true", help="CIFAR-10, 5x width, 200 epochs, on a GPU")
    p.add_argument("--data-dir")
    add_training_run_args(p, "trained bit-widths")
    p.add_argument("--emqnet-epochs", type=int, help="epochs of the 'emqnet' run (the others: see --runs)")
    p.add_argument("--device")
    p.add_argument("--threads", type=int, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--runs", help=f"comma list out of {', '.join(RUNS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the result file and doc page names")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite the docs page")
    p.add_argument("--report-only", metavar="JSON", help="only rebuild the table and doc from a results file")
    args = p.parse_args(argv)
    fill_preset(args, FULL if args.full else LONG if args.long else QUICK)
    args.bits = [int(b) for b in str(args.bits).split(",")]
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        p.error(f"unknown runs {unknown}: expected some of {', '.join(RUNS)}")
    args.mode = "full" if args.full else "long" if args.long else "quick" if args.quick else "custom"
    return args


def build_run(name: str, args, train):
    """(float model, TrainConfig) for one run."""
    _, method, extra = RUNS[name]
    extra = dict(extra)
    scale = extra.pop("epochs_x", None)
    lr = args.lr * extra.pop("lr_x", 1)
    epochs = args.epochs
    if method == "emqnet":
        epochs = args.emqnet_epochs if scale is None else (args.epochs * scale if scale else args.epochs)
    torch.manual_seed(args.seed)
    model = create(args.model, width=args.width, num_classes=train.num_classes, in_channels=train.in_channels)
    settings = dict(bits=tuple(args.bits), epochs=epochs, batch_size=args.batch_size, lr=lr, seed=args.seed,
                    eval_every=0, method=method)
    return model, TrainConfig(**{**settings, **extra})


def accuracy_at(model, loader, bits: int, device) -> float:
    with anybit.precision(model, bits):
        return evaluate(model, loader, device, quiet=True)["accuracy"]


def untrained_accuracy(model, method: str, calib, test_loader, args) -> dict:
    """Untrained bit-widths: emqnet with each rule (no data), anyprecision after BN re-calibration."""
    if method == "emqnet":
        bns = [m for m in model.modules() if isinstance(m, PRECISION_BN_TYPES)]
        if not bns:
            return {}
        out, chosen = {}, bns[0].untrained_rule
        for rule in UNTRAINED_RULES:
            for bn in bns:
                bn.untrained_rule = rule
            out[rule] = {str(b): accuracy_at(model, test_loader, b, args.device) for b in UNTRAINED}
        for bn in bns:
            bn.untrained_rule = chosen
        return out
    if method == "anyprecision":
        loader = anybit.data.make_loader(calib, args.batch_size, shuffle=True, seed=args.seed)
        for b in UNTRAINED:
            recalibrate_bn(model, loader, b, batches=20, device=args.device)
        return {"bn-recalibrated": {str(b): accuracy_at(model, test_loader, b, args.device) for b in UNTRAINED}}
    return {}


def run_one(name: str, args, train, calib, test) -> dict:
    model, config = build_run(name, args, train)
    trainer = MultiBitTrainer(model, train, None, config, device=args.device, quiet=True)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = trainer.fit()
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    test_loader = anybit.data.make_loader(test, 256, shuffle=False)
    accuracy = {str(b): accuracy_at(trainer.model_for(b), test_loader, b, args.device) for b in config.bits}
    history = result["history"]
    return {
        "run": name, "description": RUNS[name][0], "method": config.method, "config": config.to_dict(),
        "epochs": config.epochs, "wall_s": wall, "cpu_s": cpu, "timings_s": result["timings_s"],
        "accuracy": accuracy, "avg_accuracy": sum(accuracy.values()) / len(accuracy),
        "untrained": untrained_accuracy(trainer.model_for(max(config.bits)), config.method, calib, test_loader, args),
        "samples": result["samples"], "steps": sum(r["steps"] for r in history),
        "mean_overlap": sum(sum(r["overlap"].values()) / max(1, len(r["overlap"])) for r in history) / len(history),
    }


def compare(runs: list[dict]) -> None:
    ref = next((r for r in runs if r["run"] == "anyprecision"), None)
    one = next((r for r in runs if r["run"] == "dedicated-32"), None)
    for r in runs:
        if ref is not None:
            r["speedup_wall"] = ref["wall_s"] / r["wall_s"]
            r["speedup_cpu"] = ref["cpu_s"] / r["cpu_s"]
            if r["method"] != "dedicated":
                r["avg_accuracy_delta"] = r["avg_accuracy"] - ref["avg_accuracy"]
                r["bit_deltas"] = {b: a - ref["accuracy"][b] for b, a in r["accuracy"].items() if b in ref["accuracy"]}
        if one is not None:
            r["times_one_float_model"] = r["wall_s"] / one["wall_s"]


def verdict(runs: list[dict]) -> dict:
    by = {r["run"]: r for r in runs}
    r, ref = by.get("emqnet"), by.get("anyprecision")
    if r is None or ref is None:
        return {"met": None, "reason": "needs both the anyprecision and the emqnet run"}
    rule = r["config"]["bn_untrained"]
    ours = r["untrained"].get(rule, {})
    theirs = ref["untrained"].get("bn-recalibrated", {})
    untrained_ok = bool(ours) and bool(theirs) and all(ours[b] >= theirs[b] for b in ours)
    out = {
        "speedup_wall": r["speedup_wall"], "speedup_cpu": r["speedup_cpu"], "speedup_target": TARGET_SPEEDUP,
        "speed_met": r["speedup_wall"] >= TARGET_SPEEDUP,
        "avg_accuracy_delta": r["avg_accuracy_delta"], "avg_gap_allowed": TARGET_AVG_GAP,
        "avg_met": r["avg_accuracy_delta"] >= -TARGET_AVG_GAP,
        "worst_bit_delta": min(r["bit_deltas"].values()), "bit_gap_allowed": TARGET_BIT_GAP,
        "bits_met": min(r["bit_deltas"].values()) >= -TARGET_BIT_GAP,
        "untrained_rule": rule, "untrained_met": untrained_ok,
        "times_one_float_model": r.get("times_one_float_model"),
    }
    out["met"] = all(out[k] for k in ("speed_met", "avg_met", "bits_met", "untrained_met"))
    return out


def _fmt(value, spec=".2f") -> str:
    return "—" if value is None else format(value, spec)


def main_table(runs: list[dict], bits: list[int]) -> str:
    headers = ["run", "epochs", "wall s", "× faster (wall)", "× faster (CPU)", "× one float model", "steps",
               *[f"{b}-bit %" for b in sorted(bits)], "avg %", "Δ avg"]
    rows = []
    for r in runs:
        rows.append([r["run"], r["epochs"], f"{r['wall_s']:.0f}", _fmt(r.get("speedup_wall")),
                     _fmt(r.get("speedup_cpu")), _fmt(r.get("times_one_float_model")), r["steps"],
                     *[_fmt(r["accuracy"].get(str(b))) for b in sorted(bits)],
                     f"{r['avg_accuracy']:.2f}", _fmt(r.get("avg_accuracy_delta"), "+.2f")])
    return format_table(headers, rows, markdown=True)


def untrained_table(runs: list[dict]) -> str:
    rows = []
    for r in runs:
        for rule, acc in r["untrained"].items():
            rows.append([r["run"], rule, *[_fmt(acc.get(str(b))) for b in UNTRAINED],
                         f"{sum(acc.values()) / len(acc):.2f}"])
    return format_table(["run", "statistics", *[f"{b}-bit %" for b in UNTRAINED], "avg %"], rows, markdown=True)


def settings(args) -> dict:
    keys = ("mode", "dataset", "image_size", "model", "width", "bits", "epochs", "emqnet_epochs", "train_subset",
            "test_subset", "batch_size", "lr", "device", "threads", "seed", "runs")
    return {k: getattr(args, k) for k in keys}


def doc_path(tag: str) -> Path:
    return DOCS / (f"benchmarks-training-cost-{tag}.md" if tag else "benchmarks-training-cost.md")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        report = json.loads(Path(args.report_only).read_text())
        compare(report["runs"])
        report["verdict"] = verdict(report["runs"])
        write_json(Path(args.report_only), report)
        print(main_table(report["runs"], report["settings"]["bits"]))
        if not args.no_doc:
            write_doc(report, args.tag)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    train, calib, test = load_data(args)
    out = RESULTS / (f"training_cost-{args.tag}.json" if args.tag else "training_cost.json")
    report = {"benchmark": "training_cost", "command": command_line(__file__, argv), "settings": settings(args),
              "data": {"train": len(train), "test": len(test)}, "environment": environment(), "runs": []}
    started = time.perf_counter()
    for name in args.runs:
        print(f"[{time.perf_counter() - started:7.0f} s] {name} ...", flush=True)
        report["runs"].append(run_one(name, args, train, calib, test))
        compare(report["runs"])
        r = report["runs"][-1]
        print(f"    wall {r['wall_s']:.0f} s, avg {r['avg_accuracy']:.2f} %, "
              f"{ {b: round(a, 2) for b, a in r['accuracy'].items()} }", flush=True)
        report["verdict"] = verdict(report["runs"])
        report["total_s"] = time.perf_counter() - started
        write_json(out, report)
    print(main_table(report["runs"], args.bits))
    print(json.dumps(report["verdict"]))
    if not args.no_doc:
        write_doc(report, args.tag)
    return 0


def write_doc(report: dict, tag: str) -> None:
    s, v, env = report["settings"], report["verdict"], report["environment"]
    size = f"image size {s['image_size']}, " if s["image_size"] else ""
    lines = [
        "# Benchmark: training cost of emqnet vs Any-Precision",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Settings: {s['dataset']} ({report['data']['train']} train / {report['data']['test']} test samples), "
        f"{size}{s['model']} width {s['width']:g}, bits {','.join(map(str, s['bits']))}, {s['epochs']} epochs "
        f"(emqnet: {s['emqnet_epochs']}), batch {s['batch_size']}, SGD lr {s['lr']} cosine, seed {s['seed']}; "
        f"every run ends with the BatchNorm statistics pass (timed); device {s['device']}, torch threads "
        f"{env['torch_threads']} ({env['cpu_count']} CPUs), torch {env['torch']}. "
        f"Total benchmark time {report['total_s'] / 60:.1f} min.",
        "",
        main_table(report["runs"], s["bits"]),
        "",
        "wall s: wall-clock time of `MultiBitTrainer.fit()` (scoring, sampling, data loading, training, the final "
        "BatchNorm statistics pass; evaluation excluded). × faster: anyprecision's time divided by the run's "
        "(wall clock, and process CPU time, less sensitive to other work on the machine). × one float model: the "
        "run's wall time divided by `dedicated-32`'s (one float network, full data, same epochs). steps: optimizer "
        "steps. Accuracy: test top-1 at each trained bit-width; Δ avg: average minus anyprecision's.",
        "",
        "Runs: " + "; ".join(f"`{r['run']}`: {r['description']}" for r in report["runs"]) + ".",
        "",
        "Untrained bit-widths, on the same weights (emqnet: statistics derived by each rule, no data; "
        "anyprecision: a BatchNorm per bit-width copied from the nearest trained one and re-estimated on 20 "
        "batches):",
        "",
        untrained_table(report["runs"]),
        "",
    ]
    if v.get("met") is not None:
        lines += [
            f"Target (emqnet's default recipe ≥ {v['speedup_target']:g}× less wall time than anyprecision, average "
            f"within {v['avg_gap_allowed']:g} point, every bit-width within {v['bit_gap_allowed']:g} points, untrained "
            f"3/5/6 bits without data at least anyprecision's after BN re-calibration): "
            f"**{'met' if v['met'] else 'not met'}** — {v['speedup_wall']:.2f}× wall clock "
            f"({'met' if v['speed_met'] else 'not met'}; CPU time {v['speedup_cpu']:.2f}×), average "
            f"{v['avg_accuracy_delta']:+.2f} points ({'met' if v['avg_met'] else 'not met'}), worst bit-width "
            f"{v['worst_bit_delta']:+.2f} ({'met' if v['bits_met'] else 'not met'}), untrained bit-widths with the "
            f"`{v['untrained_rule']}` rule: {'met' if v['untrained_met'] else 'not met'}. emqnet took "
            f"{_fmt(v.get('times_one_float_model'))}× the time of one float model.",
            "",
        ]
    lines += [
        "Paper-scale setting (GPU; CIFAR-10 in torchvision layout under DIR):",
        "",
        "    python benchmarks/training_cost.py --full --data-dir DIR --device cuda --tag full",
        "",
        f"Raw results: `benchmarks/results/training_cost{'-' + tag if tag else ''}.json`. How to read them: "
        "[training.md](training.md#the-emqnet-recipe-and-what-it-costs).",
        "",
    ]
    path = doc_path(tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
