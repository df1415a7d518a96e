"""The small ViT (``vit_tiny``) trained multi-bit: Any-Precision against emqnet's default recipe.

Every run trains the same ViT (LayerNorm, no BatchNorm) for the same bit-widths and epochs (``emqnet-5x``:
five times as many) with the same optimizer from the same seed, then evaluates it on the test set at the trained bit-widths and at 3, 5 and 6 bits, which no
run trains at (a model without BatchNorm runs them as it is, for both methods). ``emqnet`` is
``TrainConfig(method="emqnet")``'s defaults (weight bias correction as the method sets it for a model
without BatchNorm, uniform disjoint 20 % subsets per bit-width, no distillation); ``anyprecision`` is
``TrainConfig(method="anyprecision")``'s (full data, recursive distillation). The other runs are
ablations of the quantization settings for models without BatchNorm: each changes one field of the
method's ``QuantSpec`` (the model is converted with it before training), the rest as in ``emqnet``
(or ``anyprecision``).

    python benchmarks/vit.py --quick                     # CPU, Fashion-MNIST, anyprecision and emqnet
    python benchmarks/vit.py --quick --runs emqnet,emqnet-no-wbc,emqnet-unsigned --tag ablation --no-doc

Writes benchmarks/results/vit[-<tag>].json and the table to docs/benchmarks-vit[-<tag>].md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from common import (
    Stopwatch,
    add_common_args,
    add_training_run_args,
    apply_preset,
    command_line,
    fmt,
    load_data,
    markdown_table,
    mean,
    write_json,
    write_markdown,
    write_results,
)

import anybit  # noqa: E402  (common puts src/ on the path)
import anybit.data  # noqa: E402
from anybit.evaluation import evaluate  # noqa: E402
from anybit.models import create  # noqa: E402
from anybit.quant import ActQuantizer  # noqa: E402
from anybit.report import environment  # noqa: E402
from anybit.train import METHODS, MultiBitTrainer, TrainConfig  # noqa: E402

# name: (description, method, TrainConfig settings beyond the shared ones, QuantSpec fields changed)
RUNS = {
    "anyprecision": ("TrainConfig(method='anyprecision') defaults: full data, recursive distillation",
                     "anyprecision", {}, {}),
    "emqnet": ("TrainConfig(method='emqnet') defaults", "emqnet", {}, {}),
    "emqnet-5x": ("emqnet at 5x the epochs: as many samples per bit-width as anyprecision", "emqnet",
                  {"epochs_x": 5}, {}),
    "emqnet-sign-1bit": ("emqnet with the sign code ±r/2 at 1 bit instead of the signed grid's threshold code {0, r}",
                         "emqnet", {}, {"one_bit": "sign"}),
    "emqnet-no-wbc": ("emqnet without weight bias correction", "emqnet", {}, {"wbc": False}),
    "emqnet-wbc": ("emqnet with weight bias correction", "emqnet", {}, {"wbc": True}),
    "emqnet-unsigned": ("emqnet with the CNN recipe's activation grid: fixed unsigned [0, 1]", "emqnet", {},
                        {"act_signed": False, "act_range": (0.0, 1.0)}),
    "emqnet-learned": ("emqnet with a learned signed activation range (LSQ, from the first batch's max |x|)",
                       "emqnet", {}, {"act": "learned"}),
    "emqnet-learned-unsigned": ("emqnet with a learned unsigned activation range (LSQ, first batch's min/max)",
                                "emqnet", {}, {"act": "learned", "act_signed": False}),
    "emqnet-range2": ("emqnet with a fixed signed range [-2, 2]", "emqnet", {}, {"act_range": (-2.0, 2.0)}),
    "emqnet-no-clip": ("emqnet without clipping the float member's activations", "emqnet", {},
                       {"act_clip_float": False}),
    "emqnet-attn": ("emqnet with the attention matmuls' inputs quantized (q, k, v, probabilities)", "emqnet", {},
                    {"attn_matmul": True}),
    "emqnet-attn-softmax": ("emqnet with the attention matmuls' inputs and the softmax input quantized",
                            "emqnet", {}, {"attn_matmul": True, "attn_softmax": True}),
    "emqnet-full-data": ("emqnet without coreset sampling (fraction 1): the quantization recipe alone",
                         "emqnet", {"coreset_fraction": 1.0}, {}),
    "anyprecision-unsigned": ("anyprecision with the CNN recipe's activation grid: fixed unsigned [0, 1]",
                              "anyprecision", {}, {"act_signed": False, "act_range": (0.0, 1.0)}),
    "anyprecision-attn": ("anyprecision with the attention matmuls' inputs quantized", "anyprecision", {},
                          {"attn_matmul": True}),
}
DEFAULT_RUNS = ("anyprecision", "emqnet")
UNTRAINED = (3, 5, 6)

# --quick: a few minutes on 2 CPU cores at one thread. 28x28 Fashion-MNIST, patch 7 (16 patch tokens).
QUICK = dict(dataset="fashion-mnist", image_size=28, model="vit_tiny", width=1.0, bits="1,2,4,8,32", epochs=4,
             train_subset=6000, test_subset=5000, batch_size=64, lr=1e-3, optimizer="adam", device="cpu",
             threads=1, patch_size=7, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, runs=",".join(DEFAULT_RUNS))
# --full: CIFAR-10 at 32x32, the registry's default vit_tiny (patch 4, 128 wide, 6 blocks), on a GPU.
FULL = dict(dataset="cifar10", image_size=0, model="vit_tiny", width=1.0, bits="1,2,4,8,32", epochs=100,
            train_subset=0, test_subset=0, batch_size=128, lr=1e-3, optimizer="adam", device="cuda", threads=0,
            patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0, runs=",".join(DEFAULT_RUNS))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    add_training_run_args(p, "trained bit-widths")
    p.add_argument("--optimizer", help="sgd or adam (every run)")
    p.add_argument("--patch-size", type=int)
    p.add_argument("--embed-dim", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--mlp-ratio", type=float)
    p.add_argument("--runs", help=f"comma list out of {', '.join(RUNS)}")
    p.add_argument("--report-only", metavar="JSON", help="only rebuild the table and the doc page from a results file")
    args = apply_preset(p.parse_args(argv), QUICK, FULL)
    args.bits = [int(b) for b in str(args.bits).split(",")]
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        p.error(f"unknown runs {unknown}: expected some of {', '.join(RUNS)}")
    return args


class _SignOneBit(ActQuantizer):
    """A signed activation quantizer whose 1-bit code is the sign, ``±r/2`` (fixed ``r``), for the ablation."""

    def _signed(self, x, bits, learning):
        if bits != 1:
            return super()._signed(x, bits, learning)
        r = self.hi.detach().clamp_min(1e-8)
        inside = torch.maximum(torch.minimum(x, r), -r)          # straight-through gradient inside [-r, r]
        return torch.where(x >= 0, r / 2, -r / 2).detach() + inside - inside.detach()


def build_model(args, train) -> torch.nn.Module:
    return create(args.model, image_size=train[0][0].shape[-1], in_channels=train.in_channels,
                  num_classes=train.num_classes, patch_size=args.patch_size, embed_dim=args.embed_dim,
                  depth=args.depth, num_heads=args.num_heads, mlp_ratio=args.mlp_ratio, width=args.width)


def run_one(name: str, args, train, test) -> dict:
    description, method, settings, spec_changes = RUNS[name]
    settings = dict(settings)
    epochs = args.epochs * settings.pop("epochs_x", 1)
    config = TrainConfig(**{**dict(method=method, bits=tuple(args.bits), epochs=epochs,
                                   batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                                   seed=args.seed, eval_every=0), **settings}).resolved()
    torch.manual_seed(args.seed)
    model = build_model(args, train)
    spec = METHODS[method].spec_for(config, model)
    changes = {k: v for k, v in spec_changes.items() if k != "one_bit"}
    if changes:
        spec = dataclasses.replace(spec, **changes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        anybit.convert(model, spec)   # the trainer trains an already converted model as it is
    if spec_changes.get("one_bit") == "sign":
        for m in model.modules():
            if isinstance(m, ActQuantizer) and m.signed and m.mode == "fixed":
                m.__class__ = _SignOneBit
    trainer = MultiBitTrainer(model, train, None, config, device=args.device, quiet=True)
    with Stopwatch(args.device) as sw:
        result = trainer.fit()
    loader = anybit.data.make_loader(test, 256, shuffle=False)
    accuracy, untrained = {}, {}
    eval_start = time.perf_counter()
    for b in sorted(set(args.bits) | set(UNTRAINED)):
        net = trainer.model_for(b)
        with anybit.precision(net, b):
            acc = evaluate(net, loader, args.device, quiet=True)["accuracy"]
        (accuracy if b in args.bits else untrained)[str(b)] = acc
    history = result["history"]
    return {
        "run": name, "description": description, "method": method, "config": config.to_dict(),
        "quant_spec": spec.to_dict(), "spec_changes": {k: list(v) if isinstance(v, tuple) else v
                                                       for k, v in spec_changes.items()},
        "wall_s": sw.wall, "cpu_s": sw.cpu, "eval_s": time.perf_counter() - eval_start,
        "timings_s": result["timings_s"], "steps": sum(r["steps"] for r in history),
        "samples": result["samples"], "accuracy": accuracy, "untrained": untrained,
        "avg_accuracy": mean(accuracy.values()), "avg_untrained": mean(untrained.values()),
        "train_loss": {b: m["ce"] for b, m in history[-1]["bits"].items()},
    }


def reference(runs: list[dict]) -> dict | None:
    """The run the others are compared with: anyprecision, else (ablations) emqnet."""
    by = {r["run"]: r for r in runs}
    return by.get("anyprecision") or by.get("emqnet")


def compare(runs: list[dict]) -> None:
    ref = reference(runs)
    for r in runs:
        if ref is not None:
            r["reference"] = ref["run"]
            r["speedup_wall"] = ref["wall_s"] / r["wall_s"]
            r["speedup_cpu"] = ref["cpu_s"] / r["cpu_s"]
            r["avg_delta"] = r["avg_accuracy"] - ref["avg_accuracy"]
            r["bit_deltas"] = {b: a - ref["accuracy"][b] for b, a in r["accuracy"].items() if b in ref["accuracy"]}


def main_table(runs: list[dict], bits: list[int]) -> str:
    ref = reference(runs)
    headers = ["run", "epochs", "wall s", "CPU s", "× faster (wall)", "× faster (CPU)", "steps",
               *[f"{b}-bit %" for b in sorted(bits)], "avg %", f"Δ avg vs {ref['run'] if ref else '—'}",
               *[f"{b}-bit % (untrained)" for b in UNTRAINED], "avg untrained %"]
    rows = []
    for r in runs:
        rows.append([r["run"], r["config"]["epochs"], f"{r['wall_s']:.0f}", f"{r['cpu_s']:.0f}", fmt(r.get("speedup_wall")),
                     fmt(r.get("speedup_cpu")), r["steps"], *[fmt(r["accuracy"].get(str(b))) for b in sorted(bits)],
                     fmt(r["avg_accuracy"]), fmt(r.get("avg_delta"), "+.2f"),
                     *[fmt(r["untrained"].get(str(b))) for b in UNTRAINED], fmt(r["avg_untrained"])])
    return markdown_table(headers, rows)


def settings(args) -> dict:
    keys = ("mode", "dataset", "image_size", "model", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
            "width", "bits", "epochs", "train_subset", "test_subset", "batch_size", "optimizer", "lr", "device",
            "threads", "seed", "runs")
    return {k: getattr(args, k) for k in keys}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        report = json.loads(Path(args.report_only).read_text())
        compare(report["runs"])
        write_json(Path(args.report_only), report)
        print(main_table(report["runs"], report["settings"]["bits"]))
        if not args.no_doc:
            write_doc(report, args.tag)
        return 0
    train, _, test = load_data(args)
    report = {"benchmark": "vit", "command": command_line(__file__, argv), "settings": settings(args),
              "data": {"train": len(train), "test": len(test)}, "environment": environment(), "runs": []}
    started = time.perf_counter()
    for name in args.runs:
        print(f"[{time.perf_counter() - started:6.0f} s] {name} ...", flush=True)
        report["runs"].append(run_one(name, args, train, test))
        compare(report["runs"])
        r = report["runs"][-1]
        print(f"    wall {r['wall_s']:.0f} s, avg {r['avg_accuracy']:.2f} %, "
              f"{ {b: round(a, 2) for b, a in {**r['accuracy'], **r['untrained']}.items()} }", flush=True)
        report["total_s"] = time.perf_counter() - started
        path = write_results("vit", report, args.tag)
    print(main_table(report["runs"], args.bits))
    print(f"wrote {path}")
    if not args.no_doc:
        write_doc(report, args.tag)
    return 0


def write_doc(report: dict, tag: str) -> None:
    s, env = report["settings"], report["environment"]
    runs = {r["run"]: r for r in report["runs"]}
    lines = [
        "# Benchmark: a small ViT trained multi-bit (anyprecision vs emqnet)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Settings: {s['dataset']} ({report['data']['train']} train / {report['data']['test']} test samples"
        + (f", {s['image_size']}×{s['image_size']}" if s["image_size"] else "") + f"), {s['model']} (patch "
        f"{s['patch_size']}, width {s['embed_dim']}, depth {s['depth']}, {s['num_heads']} heads, MLP ratio "
        f"{s['mlp_ratio']:g}, mean pooling, LayerNorm), bits {','.join(map(str, s['bits']))}, {s['epochs']} epochs "
        f"unless the table says otherwise, "
        f"batch {s['batch_size']}, {s['optimizer']} lr {s['lr']:g} cosine, first/last layer float, seed {s['seed']}; "
        f"device {s['device']}, torch threads {env['torch_threads']} ({env['cpu_count']} CPUs, shared with other "
        f"work), torch {env['torch']}. Whole benchmark: {report['total_s'] / 60:.1f} min.",
        "",
        main_table(report["runs"], s["bits"]),
        "",
        "wall s / CPU s: `MultiBitTrainer.fit()` (sampling, data loading, training; no evaluation), wall clock "
        "and process CPU time. × faster: the reference run's time over the run's (the reference: anyprecision, "
        "or emqnet where anyprecision did not run). steps: optimizer steps. Accuracy: test top-1 at each "
        "bit-width; *untrained*: bit-widths no run trained at, evaluated as they are (the model has no "
        "BatchNorm, so neither method needs statistics for them). Δ avg: average over the trained bit-widths "
        "minus the reference's.",
        "",
        "Runs: " + "; ".join(f"`{r['run']}`: {r['description']}" for r in report["runs"]) + ".",
        "",
    ]
    if "anyprecision" in runs and "emqnet" in runs:
        a, e = runs["anyprecision"], runs["emqnet"]
        lines += [
            f"emqnet's default recipe took {e['speedup_wall']:.2f}× less wall time than anyprecision "
            f"({e['speedup_cpu']:.2f}× CPU time) in {e['steps']} optimizer steps against {a['steps']}, at "
            f"{e['avg_delta']:+.2f} points of average accuracy over the trained bit-widths "
            f"({e['avg_accuracy']:.2f} % against {a['avg_accuracy']:.2f} %); untrained 3/5/6 bits: "
            f"{e['avg_untrained']:.2f} % against {a['avg_untrained']:.2f} %.",
            "",
        ]
    lines += [
        "Paper-scale setting (GPU; CIFAR-10 in torchvision layout under DIR):",
        "",
        "    python benchmarks/vit.py --full --data-dir DIR --device cuda --tag full",
        "",
        f"Raw results: `benchmarks/results/vit{'-' + tag if tag else ''}.json`. User guide: "
        "[training.md](training.md#vision-transformers).",
        "",
    ]
    write_markdown(f"benchmarks-vit{'-' + tag if tag else ''}.md", lines)


if __name__ == "__main__":
    sys.exit(main())
