"""Where one shared set of BatchNorm statistics fails an emqnet model, and what each remedy recovers.

emqnet runs every bit-width with one shared BatchNorm: weight bias correction is meant to align the
pre-BN activations of all bit-widths, so that one set of running statistics serves them all. This
benchmark trains emqnet with the training-cost benchmark's quick setting (or loads a checkpoint) and,
on the same weights, measures:

1. test top-1 at each trained bit-width with the shared statistics training left (the specification);
2. per BatchNorm and bit-width, how far the inputs it sees at inference are from its shared
   statistics: median over channels of |batch mean - running mean| / running std, and of
   batch variance / running variance (1.00 and 1.00 when they fit);
3. remedies, each from the same weights: the final statistics pass with the lowest bit-width's
   batches weighted ``--lean`` times (still one shared set), and statistics re-estimated at each
   bit-width separately (what one set per bit-width would give; ``anybit eval --recalibrate-bn``).

    python benchmarks/bn_statistics.py --quick                       # CPU, about 4 minutes
    python benchmarks/bn_statistics.py --full --data-dir DIR         # CIFAR-10, 5x width, 200 epochs, GPU
    python benchmarks/bn_statistics.py --checkpoint RUN --dataset fashion-mnist   # a trained model

Writes benchmarks/results/bn_statistics[-<tag>].json and docs/benchmarks-bn-statistics.md.
"""

from __future__ import annotations

import argparse
import copy
from statistics import median

import torch
from torch import nn

from common import (
    Stopwatch,
    add_common_args,
    add_training_run_args,
    apply_preset,
    bn_reestimated_accuracy,
    command_line,
    fmt,
    load_data,
    markdown_table,
    mean,
    write_markdown,
    write_results,
)

import anybit  # noqa: E402  (common puts src/ on the path)
from anybit.data import make_loader  # noqa: E402
from anybit.evaluation import evaluate_bits  # noqa: E402
from anybit.models import create  # noqa: E402
from anybit.report import environment  # noqa: E402
from anybit.quant import PRECISION_BN_TYPES  # noqa: E402
from anybit.train import MultiBitTrainer, TrainConfig, bn_bits, reestimate_bn  # noqa: E402

# The training-cost benchmark's quick setting, with the coreset run that trains well in so few steps
# (hard labels at every bit-width; see benchmarks-training-cost.md).
QUICK = dict(dataset="fashion-mnist", image_size=28, model="resnet20", width=0.5, bits="1,2,4,8,32", epochs=10,
             train_subset=5000, test_subset=2000, batch_size=32, lr=0.05, fraction=0.2, distill="none",
             stat_images=512, device="cpu", threads=0)
FULL = dict(dataset="cifar10", image_size=0, model="resnet20", width=5.0, bits="1,2,4,8,32", epochs=200,
            train_subset=0, test_subset=0, batch_size=128, lr=0.1, fraction=0.2, distill="recursive",
            stat_images=2048, device="cuda", threads=0)
FIT = (0.8, 1.25)   # a variance ratio inside this band counts as fitting the shared statistics


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--checkpoint", help="analyse this trained emqnet checkpoint instead of training one")
    add_training_run_args(p, "bit-widths to train and measure")
    p.add_argument("--fraction", type=float, help="coreset fraction per bit-width")
    p.add_argument("--distill", help="recursive, from-top, none")
    p.add_argument("--stat-images", type=int, help="training images the mismatch is measured on")
    p.add_argument("--lean", type=int, default=3,
                   help="the lowest bit-width's weight in the leaning statistics pass (default: 3)")
    p.add_argument("--bn-batches", type=int, default=20, help="batches per bit-width of every statistics pass")
    args = apply_preset(p.parse_args(argv), QUICK, FULL)
    args.bits = anybit.quant.parse_bit_list(args.bits)
    if args.lean < 1 or args.bn_batches < 1 or args.stat_images < 1:
        p.error("--lean, --bn-batches and --stat-images must be at least 1")
    return args


def train_model(args, train) -> tuple[nn.Module, float]:
    torch.manual_seed(args.seed)
    model = create(args.model, width=args.width, num_classes=train.num_classes, in_channels=train.in_channels)
    # One set of statistics for every bit-width (what this benchmark diagnoses; emqnet's default keeps a set
    # per bit-width), with the sampler this record was measured with.
    config = TrainConfig(method="emqnet", bits=tuple(args.bits), epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, coreset_fraction=args.fraction, distill=args.distill, seed=args.seed,
                         eval_every=0, final_bn_batches=args.bn_batches, bn_stats="shared", coreset_score="el2n")
    trainer = MultiBitTrainer(model, train, None, config, device=args.device, quiet=True)
    with Stopwatch(args.device) as sw:
        trainer.fit()
    return trainer.model_for(max(args.bits)), sw.wall


@torch.no_grad()
def mismatch(model: nn.Module, images: torch.Tensor, settings: dict, batch_size: int) -> dict:
    """{BN name: {label: (median |Δmean|/std, median var ratio)}} of the inputs each BatchNorm sees in
    eval mode (upstream BatchNorms on their running statistics, as at inference) against its own, at
    each of ``settings`` ({label: bits or (w, a)})."""
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    sums: dict[str, list] = {}

    def hook(name):
        def record(_module, inputs):
            x = inputs[0].transpose(0, 1).flatten(1).double()   # channels x values
            acc = sums.setdefault(name, [0, 0.0, 0.0])
            acc[0] += x.shape[1]
            acc[1] = acc[1] + x.sum(1)
            acc[2] = acc[2] + (x * x).sum(1)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in bns.items()]
    model.eval()
    out: dict[str, dict] = {n: {} for n in bns}
    try:
        for label, b in settings.items():
            sums.clear()
            with anybit.precision(model, b):
                for chunk in images.split(batch_size):
                    model(chunk)
            for name, (count, s, ss) in sums.items():
                mu = s / count
                var = ss / count - mu * mu
                bn = bns[name]
                std = bn.running_var.double().sqrt()
                shift = ((mu - bn.running_mean.double()).abs() / std).median().item()
                ratio = (var / bn.running_var.double()).median().item()
                out[name][label] = (shift, ratio)
    finally:
        for h in handles:
            h.remove()
    return out


def accuracy_at(model, test_loader, bits, device) -> dict[str, float]:
    return {str(b): r["accuracy"] for b, r in evaluate_bits(model, test_loader, bits, device, quiet=True).items()}


def load_shared_bn_model(path: str, device) -> nn.Module:
    """A trained emqnet checkpoint, or a clear exit: this analysis needs one shared set of BatchNorms."""
    try:
        model = anybit.load(path).to(device)
    except (anybit.checkpoint.CheckpointError, OSError) as e:
        raise SystemExit(f"--checkpoint {path}: {e}") from None
    if bn_bits(model):
        raise SystemExit(f"--checkpoint {path} has one BatchNorm per bit-width (anyprecision): nothing is shared; "
                         "give an emqnet checkpoint")
    if any(isinstance(m, PRECISION_BN_TYPES) for m in model.modules()):
        raise SystemExit(f"--checkpoint {path} keeps BatchNorm statistics per precision (--bn-stats per-precision): "
                         "there is no single set to diagnose; give a checkpoint trained with --bn-stats shared")
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise SystemExit(f"--checkpoint {path} has no BatchNorm: there are no statistics to compare")
    return model


def main(argv=None) -> dict:
    args = parse_args(argv)
    with Stopwatch() as total:
        train, calib, test = load_data(args)
        if args.checkpoint:
            model, train_s = load_shared_bn_model(args.checkpoint, args.device), None
        else:
            model, train_s = train_model(args, train)
        test_loader = make_loader(test, 256, shuffle=False)
        calib_loader = make_loader(calib, args.batch_size, shuffle=True, seed=args.seed)
        torch.manual_seed(args.seed)
        pick = torch.randperm(len(calib))[:args.stat_images]
        images = torch.stack([calib[int(i)][0] for i in pick]).to(args.device)

        shared = accuracy_at(model, test_loader, args.bits, args.device)
        lowest = min(args.bits)
        # The lowest bit-width once more with only its weights, and with only its activations, quantized.
        settings = {**{f"W{b}A{b}": b for b in args.bits}, f"W{lowest}A32": (lowest, 32), f"W32A{lowest}": (32, lowest)}
        layers = mismatch(model, images, settings, 256)
        as_trained = copy.deepcopy(model.state_dict())
        # Repeating a bit-width in the pass gives it that many more batches in the one shared set.
        reestimate_bn(model, calib_loader, [lowest] * args.lean + [b for b in args.bits if b != lowest],
                      args.bn_batches, args.device)
        leaning = accuracy_at(model, test_loader, args.bits, args.device)
        model.load_state_dict(as_trained)
        per_bit = bn_reestimated_accuracy(model, calib_loader, test_loader, args.bits, args.device,
                                          batches=args.bn_batches)
    report = {
        "benchmark": "bn_statistics",
        "command": command_line(__file__, argv),
        "settings": {k: getattr(args, k) for k in (
            "mode", "checkpoint", "dataset", "image_size", "model", "width", "bits", "epochs", "train_subset",
            "test_subset", "batch_size", "lr", "fraction", "distill", "stat_images", "lean", "bn_batches",
            "device", "threads", "seed")},
        "train_s": train_s,
        "accuracy": {"shared": shared, "shared_leaning": leaning, "per_bit": per_bit},
        "mismatch": {name: {label: {"mean_shift": s, "var_ratio": r} for label, (s, r) in row.items()}
                     for name, row in layers.items()},
        "environment": environment(),
        "total_s": total.wall,
    }
    path = write_results("bn_statistics", report, args.tag)
    print("\n".join(summary_lines(report)))
    print(f"wrote {path}")
    if not args.no_doc:
        print(f"wrote {write_markdown('benchmarks-bn-statistics.md', doc_lines(report))}")
    return report


def accuracy_table(report: dict) -> str:
    bits = report["settings"]["bits"]
    names = {"shared": "shared statistics, as trained (the specification)",
             "shared_leaning": f"shared, pass leaning {report['settings']['lean']}× to {min(bits)}-bit",
             "per_bit": "re-estimated per bit-width (one set each)"}
    rows = []
    for key, label in names.items():
        acc = report["accuracy"][key]
        rows.append([label] + [fmt(acc[str(b)]) for b in bits] + [fmt(mean(acc.values()))])
    return markdown_table(["statistics"] + [f"{b}-bit %" for b in bits] + ["avg %"], rows)


def mismatch_tables(report: dict) -> tuple[str, str]:
    layers = report["mismatch"]
    bits = list(next(iter(layers.values())))
    summary = []
    for b in bits:
        shifts = [row[b]["mean_shift"] for row in layers.values()]
        ratios = [row[b]["var_ratio"] for row in layers.values()]
        misfit = [n for n, row in layers.items() if not FIT[0] <= row[b]["var_ratio"] <= FIT[1]]
        summary.append([b, fmt(median(shifts)), fmt(median(ratios)), fmt(min(ratios)), fmt(max(ratios)),
                        f"{len(misfit)}/{len(layers)}", misfit[0] if misfit else "—"])
    head = ["precision", "median Δmean/std", "median var ratio", "min var ratio", "max var ratio",
            f"BNs off [{FIT[0]}, {FIT[1]}]", "first such BN"]
    per_layer = [[name] + [f"{row[b]['mean_shift']:.2f} / {row[b]['var_ratio']:.2f}" for b in bits]
                 for name, row in layers.items()]
    return (markdown_table(head, summary),
            markdown_table(["BatchNorm"] + [f"{b} Δmean/std / var ratio" for b in bits], per_layer))


def summary_lines(report: dict) -> list[str]:
    summary, _ = mismatch_tables(report)
    return [accuracy_table(report), "", summary]


def doc_lines(report: dict) -> list[str]:
    s = report["settings"]
    summary, per_layer = mismatch_tables(report)
    source = (f"checkpoint `{s['checkpoint']}`" if s["checkpoint"] else
              f"emqnet trained here: {s['dataset']} ({s['train_subset'] or 'all'} train images), {s['model']} "
              f"width {s['width']}, bits {','.join(map(str, s['bits']))}, {s['epochs']} epochs, batch "
              f"{s['batch_size']}, SGD lr {s['lr']} cosine, coreset fraction {s['fraction']}, distillation "
              f"{s['distill']}, ending with the BatchNorm statistics pass ({s['bn_batches']} batches per "
              f"bit-width); training took {report['train_s']:.0f} s")
    return [
        "# Benchmark: one shared set of BatchNorm statistics",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Model: {source}. Test top-1 on {s['test_subset'] or 'all'} test images; the mismatch is measured on "
        f"{s['stat_images']} training images; device {s['device']}. Total benchmark time "
        f"{report['total_s'] / 60:.1f} min.",
        "",
        "## Accuracy on the same weights",
        "",
        accuracy_table(report),
        "",
        "## How far each bit-width's BatchNorm inputs are from the shared statistics",
        "",
        "In eval mode, as at inference: every BatchNorm upstream normalises with the shared statistics, so a "
        "misfit early in the network reaches the later layers too. Δmean/std: median over channels of |batch "
        "mean − running mean| / running std; var ratio: median over channels of batch variance / running "
        "variance. A bit-width that fits has 0.00 and 1.00.",
        "",
        summary,
        "",
        "<details><summary>Per BatchNorm</summary>",
        "",
        per_layer,
        "",
        "</details>",
        "",
        "Raw results: `benchmarks/results/bn_statistics.json`. What this means for training and the options "
        "it leaves: [training.md](training.md#batchnorm-statistics-per-precision).",
    ]


if __name__ == "__main__":
    main()
