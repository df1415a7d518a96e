"""``anybit eval``: accuracy of a checkpoint at a list of bit-widths, trained or not."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import anybit
from anybit import data as anydata
from anybit.checkpoint import checkpoint_paths
from anybit.evaluation import evaluate
from anybit.quant import parse_bit_list, precision
from anybit.report import RunRecorder, format_table, plot_accuracy_vs_bits
from anybit.train import nearest_bits, recalibrate_bn, shared_bn_recalibrated

from .common import (
    CLIError,
    add_data_args,
    add_device_args,
    add_test_subset_arg,
    positive_int,
    resolve_device,
    seed_everything,
    subset_of,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint at several bit-widths",
        description="Evaluate a checkpoint (a run directory or NAME.safetensors) at each bit-width, including "
                    "bit-widths it was not trained at, and print a table of accuracy per bit-width. A model with "
                    "one BatchNorm per trained bit-width (anyprecision) needs --recalibrate-bn for the others; a "
                    "shared-BN model (emqnet) runs every bit-width as it is, or with --recalibrate-bn re-estimates "
                    "the shared statistics at each bit-width before evaluating it (the checkpoint is not changed).",
    )
    p.add_argument("checkpoint", help="run directory or checkpoint path")
    p.add_argument("--bits", help="bit-widths, e.g. 1,2,4,8,32 or 1-8,32 (default: 1-8,32; for a checkpoint "
                                  "written by anybit ptq, the precision it was calibrated at)")
    add_data_args(p)
    p.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                   help="dataset option, repeatable (default: the options recorded at training)")
    add_test_subset_arg(p)
    p.add_argument("--recalibrate-bn", action="store_true",
                   help="switchable-BN models: add a BatchNorm for each untrained bit-width (copied from the "
                        "nearest trained one) and re-estimate its statistics on training data; shared-BN "
                        "models: re-estimate the shared statistics at each evaluated bit-width")
    p.add_argument("--recalibrate-batches", type=positive_int, default=20, metavar="N",
                   help="batches of training data for BN re-calibration (default: %(default)s)")
    p.add_argument("--bit-map", metavar="FILE",
                   help="evaluate once at a per-layer bit map (bitmap.json written by anybit mixed) "
                        "instead of at uniform --bits")
    p.add_argument("--out", help="directory for run.json and accuracy.png (default: CHECKPOINT_DIR/eval)")
    p.add_argument("--seed", type=int, default=0)
    add_device_args(p)
    p.set_defaults(func=run)


def dataset_from_metadata(args: argparse.Namespace, meta: dict) -> tuple[str, dict]:
    """Dataset name and options: from the command line, else from the checkpoint's metadata."""
    from .train_cmd import parse_data_options

    saved = meta.get("metadata", {}).get("data", {})
    name = args.dataset or saved.get("dataset")
    if not name:
        raise CLIError("this checkpoint does not record its dataset; pass --dataset NAME")
    options = saved.get("options", {}) if name == saved.get("dataset") else {}
    options = {**options, **parse_data_options(getattr(args, "data_option", []) or [])}
    return name, options


def switchable_bn_bits(meta: dict) -> list[int] | None:
    """Bit-widths with their own BatchNorm (switchable-BN checkpoints), else None."""
    spec = meta.get("model", {}).get("quant_spec") or {}
    return sorted(spec.get("bn_bits", [])) if spec.get("bn") == "switchable" else None


def run(args: argparse.Namespace) -> int:
    if args.bit_map and args.bits is not None:
        raise CLIError("--bit-map and --bits contradict each other: a bit map sets every layer's precision; "
                       "give one of them")
    bits = parse_bit_list("1-8,32" if args.bits is None else args.bits)   # bad input first, before any file
    meta = anybit.read_metadata(args.checkpoint)
    if args.bit_map or (args.bits is None and meta.get("metadata", {}).get("ptq")):
        # a PTQ checkpoint is loaded at the precision it was calibrated at (the checkpoint stores it)
        return run_bit_map(args, meta)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    info = meta.get("metadata", {})
    trained = sorted(info.get("bits_trained") or [])
    bn_bits = switchable_bn_bits(meta)
    need_bn = [b for b in bits if bn_bits is not None and b not in bn_bits]
    if need_bn and not args.recalibrate_bn:
        raise CLIError(
            f"bit-widths {need_bn} were not trained and this model has one BatchNorm per trained bit-width "
            f"({bn_bits}, method {info.get('method', 'anyprecision')}): pass --recalibrate-bn to re-estimate "
            f"BatchNorm statistics for them, or evaluate only {bn_bits}"
        )
    name, options = dataset_from_metadata(args, meta)

    out = Path(args.out) if args.out else checkpoint_paths(args.checkpoint)[0].parent / "eval"
    recorder = RunRecorder(out, "eval", {"checkpoint": str(args.checkpoint), "bits": bits, "dataset": name,
                                         "options": options, "batch_size": args.batch_size, "device": str(device),
                                         "recalibrate_bn": args.recalibrate_bn,
                                         "recalibrate_batches": args.recalibrate_batches,
                                         "test_subset": args.test_subset})
    with recorder.timed("data"):
        test_set = anydata.load(name, "test", data_dir=args.data_dir, **options)
        test_set = subset_of(test_set, args.test_subset, "--test-subset", args.seed)
    with recorder.timed("load"):
        models = load_models(args.checkpoint, meta, bits, device)
    for model in {id(m): m for m in models.values()}.values():
        _check_fits(model, test_set)

    recal: dict[int, dict] = {}
    shared_recal = args.recalibrate_bn and bn_bits is None and info.get("method") != "dedicated"
    if args.recalibrate_bn and info.get("method") == "dedicated" and not args.quiet:
        print("note: dedicated models each keep the BatchNorm statistics of their own bit-width; "
              "--recalibrate-bn does not apply and is ignored")
    if need_bn or shared_recal:
        with recorder.timed("data"):
            calib = anydata.load(name, "train", data_dir=args.data_dir, augment=False, **options)
            loader = anydata.make_loader(calib, args.batch_size, shuffle=True, seed=args.seed)
        with recorder.timed("recalibrate_bn"):
            for b in need_bn:
                recal[b] = recalibrate_bn(models[b], loader, b, batches=args.recalibrate_batches, device=device)

    test_loader = anydata.make_loader(test_set, args.batch_size, shuffle=False)
    results = {}
    with recorder.timed("eval"):
        for b in bits:
            with contextlib.ExitStack() as stack:
                if shared_recal:
                    recal[b] = stack.enter_context(shared_bn_recalibrated(
                        models[b], loader, b, batches=args.recalibrate_batches, device=device))
                stack.enter_context(precision(models[b], b))
                results[b] = evaluate(models[b], test_loader, device, desc=f"eval {b}-bit", quiet=args.quiet)
            results[b]["trained"] = b in trained
            results[b]["bn_recalibration_s"] = recal[b]["seconds"] if b in recal else None
            if info.get("method") == "dedicated":
                results[b]["model_bits"] = nearest_bits(b, trained)
    recorder.data["metrics"] = {str(b): r for b, r in results.items()}
    recorder.data["bn_recalibration"] = {str(b): r for b, r in recal.items()}
    recorder.data["trained_bits"] = trained
    recorder.data["method"] = info.get("method")
    plot_accuracy_vs_bits({info.get("method") or "model": {b: r["accuracy"] for b, r in results.items()}},
                          out / "accuracy.png", trained={info.get("method") or "model": trained or bits})
    path = recorder.write()

    headers = ["bits", "trained", "top-1 %", "loss", "eval s", "BN recal s"]
    rows = [[b, "yes" if r["trained"] else "no", r["accuracy"], f"{r['loss']:.4f}", r["seconds"],
             r["bn_recalibration_s"]] for b, r in results.items()]
    if info.get("method") == "dedicated":
        headers.append("model")
        for row, r in zip(rows, results.values()):
            row.append(f"{r['model_bits']}-bit model")
    print(format_table(headers, rows))
    print(f"wrote {path} and {out / 'accuracy.png'}")
    return 0


def run_bit_map(args: argparse.Namespace, meta: dict) -> int:
    """``anybit eval --bit-map FILE`` (or a PTQ checkpoint as saved): accuracy at one per-layer precision."""
    from anybit import mixed

    device = resolve_device(args.device)
    seed_everything(args.seed)
    if meta.get("metadata", {}).get("members"):
        raise CLIError("a dedicated run holds one model per bit-width; a per-layer bit map needs one shared model")
    name, options = dataset_from_metadata(args, meta)
    model = anybit.load(args.checkpoint).to(device)
    label = "as calibrated (anybit ptq)"
    if args.bit_map:
        anybit.set_precision(model, mixed.load_bit_map(args.bit_map, model))
        label = Path(args.bit_map).name
    test_set = anydata.load(name, "test", data_dir=args.data_dir, **options)
    test_set = subset_of(test_set, args.test_subset, "--test-subset", args.seed)
    _check_fits(model, test_set)
    out = Path(args.out) if args.out else checkpoint_paths(args.checkpoint)[0].parent / "eval"
    recorder = RunRecorder(out, "eval", {"checkpoint": str(args.checkpoint), "bit_map": args.bit_map or label,
                                         "dataset": name, "options": options, "device": str(device)})
    loader = anydata.make_loader(test_set, args.batch_size, shuffle=False)
    with recorder.timed("eval"):
        result = evaluate(model, loader, device, desc="eval bit map", quiet=args.quiet)
    recorder.data["metrics"] = {"bit_map": result}
    path = recorder.write()
    print(format_table(["precision", "top-1 %", "loss"], [[label, result["accuracy"], f"{result['loss']:.4f}"]]))
    print(f"wrote {path}")
    return 0


def load_models(checkpoint, meta: dict, bits: list[int], device) -> dict:
    """The network that runs each bit-width: the checkpoint itself, or for a ``dedicated`` run the member
    trained at (or nearest to) that bit-width."""
    info = meta.get("metadata", {})
    members = info.get("members")
    if not members:
        model = anybit.load(checkpoint).to(device)
        return dict.fromkeys(bits, model)
    directory = checkpoint_paths(checkpoint)[0].parent
    trained = sorted(int(b) for b in members)
    loaded: dict[int, object] = {}
    chosen = {}
    for b in bits:
        t = nearest_bits(b, trained)
        if t not in loaded:
            loaded[t] = anybit.load(directory / members[str(t)]).to(device)
        chosen[b] = loaded[t]
    return chosen


def _check_fits(model, dataset) -> None:
    classes = getattr(model, "anybit_meta", {}).get("arch_kwargs", {}).get("num_classes")
    if classes is not None and classes != dataset.num_classes:
        raise CLIError(f"the checkpoint predicts {classes} classes but {dataset.name} has {dataset.num_classes}; "
                       f"evaluate it on the dataset it was trained for")
