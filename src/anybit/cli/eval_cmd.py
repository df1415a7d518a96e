"""``anybit eval``: accuracy of a checkpoint at a list of bit-widths, trained or not."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import anybit
from anybit import data as anydata
from anybit import mixed
from anybit.checkpoint import checkpoint_paths
from anybit.evaluation import evaluate, evaluate_onnx
from anybit.quant import BitsError, parse_bit_list, precision
from anybit.report import RunRecorder, format_table, plot_accuracy_vs_bits
from anybit.train import nearest_bits, recalibrate_bn, shared_bn_recalibrated

from .common import (
    load_split,
    MIXED_CALIB_SIZE,
    CLIError,
    add_data_args,
    check_model_fits,
    data_inputs,
    data_source,
    parse_data_options,
    prepare_out_dir,
    seed_int,
    add_data_option_arg,
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
                    "one BatchNorm per trained bit-width (anyprecision) needs --recalibrate-bn for the others; an "
                    "emqnet model runs every bit-width as it is (untrained ones with BatchNorm statistics derived "
                    "from the trained ones), or with --recalibrate-bn re-estimates the statistics at each bit-width "
                    "before evaluating it (the checkpoint is not changed).",
    )
    p.add_argument("checkpoint", help="run directory or checkpoint path")
    p.add_argument("--bits", help="bit-widths, e.g. 1,2,4,8,32 or 1-8,32 (default: 1-8,32; for a checkpoint "
                                  "written by anybit ptq, the precision it was calibrated at)")
    add_data_args(p)
    add_data_option_arg(p, "default: the options the checkpoint records")
    add_test_subset_arg(p)
    p.add_argument("--recalibrate-bn", action="store_true",
                   help="switchable-BN models: add a BatchNorm for each untrained bit-width (copied from the "
                        "nearest trained one) and re-estimate its statistics on training data; emqnet models: "
                        "re-estimate the statistics used at each evaluated bit-width")
    p.add_argument("--recalibrate-batches", type=positive_int, metavar="N",
                   help=f"with --recalibrate-bn: batches of training data for it (default: {RECALIBRATE_BATCHES})")
    p.add_argument("--bit-map", metavar="FILE",
                   help="evaluate once at a per-layer bit map (bitmap.json written by anybit mixed) "
                        "instead of at uniform --bits")
    p.add_argument("--onnx", action="store_true",
                   help="evaluate the ONNX export in CHECKPOINT (a directory written by anybit export --format onnx) "
                        "on ONNX Runtime")
    p.add_argument("--threads", type=positive_int, help="--onnx: ONNX Runtime intra-op threads (default: its own)")
    p.add_argument("--out", help="directory for run.json and accuracy.png (default: CHECKPOINT_DIR/eval)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (default: %(default)s)")
    add_device_args(p)
    p.set_defaults(func=run)


def dataset_from_metadata(args: argparse.Namespace, meta: dict) -> tuple[str, dict]:
    """Dataset name and options: from the command line, else from the checkpoint's metadata."""
    hf = meta.get("model", {}).get("hf")
    if isinstance(hf, dict):
        raise CLIError(f"this is a Hugging Face transformers checkpoint ({hf.get('class')}, from {hf.get('source')}), "
                       f"not an image classifier: compare it with its float model on text (anybit ptq DIR "
                       f"--calib-text FILE --test-text FILE, or anybit.evaluation.compare_outputs)")
    saved = meta.get("metadata", {}).get("data", {})
    name = args.dataset or saved.get("dataset")
    if not name:
        raise CLIError("this checkpoint does not record its dataset; pass --dataset NAME")
    options = saved.get("options", {}) if name == saved.get("dataset") else {}
    options = {**options, **parse_data_options(getattr(args, "data_option", []) or [])}
    return name, options


RECALIBRATE_BATCHES = 20


def switchable_bn_bits(meta: dict) -> list[int] | None:
    """Bit-widths with their own BatchNorm (switchable-BN checkpoints), else None (also for a model converted
    with ``bn="switchable"`` that has no BatchNorm to switch, such as a LayerNorm ViT)."""
    spec = meta.get("model", {}).get("quant_spec") or {}
    conversion = meta.get("model", {}).get("conversion") or {}
    if "switchable_bn" in conversion and not conversion["switchable_bn"]:
        return None
    return sorted(spec.get("bn_bits", [])) if spec.get("bn") == "switchable" else None


def run(args: argparse.Namespace) -> int:
    if args.bit_map and args.bits is not None:
        raise CLIError("--bit-map and --bits contradict each other: a bit map sets every layer's precision; "
                       "give one of them")
    if args.recalibrate_batches is not None and not args.recalibrate_bn:
        raise CLIError("--recalibrate-batches sets how --recalibrate-bn re-estimates statistics; add "
                       "--recalibrate-bn or drop it")
    if args.bit_map and args.recalibrate_bn:
        raise CLIError("--recalibrate-bn applies to uniform --bits, not to a --bit-map; drop one of them")
    args.recalibrate_batches = args.recalibrate_batches or RECALIBRATE_BATCHES
    if args.threads is not None and not args.onnx:
        raise CLIError("--threads sets ONNX Runtime's threads for --onnx; add --onnx or drop it")
    if args.onnx:
        return run_onnx(args)
    try:
        bits = parse_bit_list("1-8,32" if args.bits is None else args.bits)   # bad input first, before any file
    except BitsError as e:
        raise CLIError(f"--bits: {e}") from None
    meta = anybit.read_metadata(args.checkpoint, packed=True)
    if "packed" in meta:
        return run_packed(args, meta)
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

    out = eval_out_dir(args)
    recorder = RunRecorder(out, "eval", {"checkpoint": str(args.checkpoint), "bits": bits, "dataset": name,
                                         "options": options, "batch_size": args.batch_size, "device": str(device),
                                         "recalibrate_bn": args.recalibrate_bn,
                                         "recalibrate_batches": args.recalibrate_batches,
                                         "test_subset": args.test_subset})
    with recorder.timed("data"):
        test_set = load_split(name, "test", args.data_dir, options)
        recorder.data["config"]["data_source"] = data_source(test_set)
        test_set = subset_of(test_set, args.test_subset, "--test-subset", args.seed)
    with recorder.timed("load"):
        models = load_models(args.checkpoint, meta, bits, device)
    if info.get("ptq"):
        _check_ptq_bits(next(iter(models.values())), bits)
    for model in {id(m): m for m in models.values()}.values():
        check_model_fits(model, test_set)

    recal: dict[int, dict] = {}
    shared_recal = args.recalibrate_bn and bn_bits is None and info.get("method") != "dedicated"
    if args.recalibrate_bn and info.get("method") == "dedicated" and not args.quiet:
        print("note: dedicated models each keep the BatchNorm statistics of their own bit-width; "
              "--recalibrate-bn does not apply and is ignored")
    if need_bn or shared_recal:
        with recorder.timed("data"):
            calib = load_split(name, "train", args.data_dir, options, augment=False)
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
    device = resolve_device(args.device)
    seed_everything(args.seed)
    if meta.get("metadata", {}).get("members"):
        raise CLIError("a dedicated run holds one model per bit-width; a per-layer bit map needs one shared model")
    name, options = dataset_from_metadata(args, meta)
    out = eval_out_dir(args)
    model = anybit.load(args.checkpoint).to(device)
    label = "as calibrated (anybit ptq)"
    test_set = load_split(name, "test", args.data_dir, options)
    test_set = subset_of(test_set, args.test_subset, "--test-subset", args.seed)
    check_model_fits(model, test_set)
    calibrated = None
    if args.bit_map:
        bit_map = mixed.load_bit_map(args.bit_map, model)
        setup = None
        if mixed.needs_calibration(model, {a for _, a in bit_map.values()}):
            # as anybit mixed measured it: min/max ranges over the same calibration images
            train_set = load_split(name, "train", args.data_dir, options, augment=False)
            calib = subset_of(train_set, None, "--calib-size", args.seed, default=MIXED_CALIB_SIZE)
            setup = mixed.MinMaxSetup(anydata.make_loader(calib, args.batch_size, shuffle=False), device=device)
            calibrated = {"activation_ranges": "min/max", "samples": len(calib)}
        mixed.apply_allocation(model, bit_map, setup)
        label = Path(args.bit_map).name
    (out / "accuracy.png").unlink(missing_ok=True)   # a previous eval's plot; one precision gives none
    recorder = RunRecorder(out, "eval", {"checkpoint": str(args.checkpoint), "bit_map": args.bit_map or label,
                                         "dataset": name, "options": options, "device": str(device),
                                         "calibrated": calibrated, "data_source": data_source(test_set)})
    loader = anydata.make_loader(test_set, args.batch_size, shuffle=False)
    with recorder.timed("eval"):
        result = evaluate(model, loader, device, desc="eval bit map", quiet=args.quiet)
    recorder.data["metrics"] = {"bit_map": result}
    path = recorder.write()
    if calibrated:
        print(f"activation ranges the checkpoint had no calibration for: min/max over {calibrated['samples']} "
              f"training images (as anybit mixed sets them)")
    print(format_table(["precision", "top-1 %", "loss"], [[label, result["accuracy"], f"{result['loss']:.4f}"]]))
    print(f"wrote {path}")
    return 0


def _reject_for_exports(args: argparse.Namespace, what: str) -> None:
    for flag, value in (("--bit-map", args.bit_map), ("--recalibrate-bn", args.recalibrate_bn)):
        if value:
            raise CLIError(f"{flag} does not apply to {what}, which runs the precision it was exported at; "
                           f"use it on the checkpoint the export came from")


def run_packed(args: argparse.Namespace, meta: dict) -> int:
    """``anybit eval DIR`` on a packed export: its precision, or every bit-width of a package (or ``--bits``)."""
    _reject_for_exports(args, "a packed export")
    served = [p["bits"] for p in meta["packed"]["precisions"]]
    if args.bits is None:
        bits = served
    else:
        bits = parse_bit_list(args.bits)
        missing = [b for b in bits if b not in served]
        if missing:
            held = "one per-layer bit map" if served == [None] else f"bit-widths {served}"
            raise CLIError(f"this packed export holds {held}, not {missing}; leave out --bits to evaluate what it holds")
    device = resolve_device(args.device)
    seed_everything(args.seed)
    name, options = dataset_from_metadata(args, meta)
    out = eval_out_dir(args)
    (out / "accuracy.png").unlink(missing_ok=True)
    recorder = RunRecorder(out, "eval", {"checkpoint": str(args.checkpoint), "packed": True, "bits": bits,
                                         "dataset": name, "options": options, "device": str(device),
                                         "test_subset": args.test_subset})
    test_set = anydata.load(name, "test", data_dir=args.data_dir, **options)
    test_set = subset_of(test_set, args.test_subset, "--test-subset", args.seed)
    loader = anydata.make_loader(test_set, args.batch_size, shuffle=False)
    results = {}
    for b in bits:
        with recorder.timed("load"):
            model = anybit.load(args.checkpoint, bits=b if len(served) > 1 else None).to(device)
        check_model_fits(model, test_set)
        label = "bit map" if b is None else str(b)
        with recorder.timed("eval"):
            results[label] = evaluate(model, loader, device, desc=f"eval {label}", quiet=args.quiet)
    recorder.data["metrics"] = results
    path = recorder.write()
    print(format_table(["precision", "top-1 %", "loss", "eval s"],
                       [[k, r["accuracy"], f"{r['loss']:.4f}", r["seconds"]] for k, r in results.items()]))
    print(f"wrote {path}")
    return 0


def run_onnx(args: argparse.Namespace) -> int:
    """``anybit eval DIR --onnx``: accuracy of the ONNX export on ONNX Runtime."""
    from anybit.export import onnx_session
    from anybit.export.onnx_qdq import onnx_paths

    _reject_for_exports(args, "an ONNX export")
    if args.bits is not None:
        raise CLIError("--bits does not apply to --onnx: an ONNX export holds one precision")
    session = onnx_session(args.checkpoint, threads=args.threads)
    meta = session.sidecar
    if not meta:
        raise CLIError(f"{args.checkpoint} has no anybit sidecar (model.json); pass --dataset and run it yourself "
                       f"with anybit.export.onnx_session")
    name, options = dataset_from_metadata(args, meta)
    seed_everything(args.seed)
    out = eval_out_dir(args, onnx_paths(args.checkpoint))
    test_set = anydata.load(name, "test", data_dir=args.data_dir, **options)
    test_set = subset_of(test_set, args.test_subset, "--test-subset", args.seed)
    expected = meta.get("input_shape")
    if expected and [test_set.in_channels, test_set.image_size, test_set.image_size] != expected:
        raise CLIError(f"the ONNX model takes {expected} inputs but {name} gives "
                       f"{[test_set.in_channels, test_set.image_size, test_set.image_size]}; use the dataset and "
                       f"options it was exported for (--dataset, --data-option)")
    recorder = RunRecorder(out, "eval", {"checkpoint": str(args.checkpoint), "onnx": True, "dataset": name,
                                         "options": options, "threads": args.threads, "test_subset": args.test_subset})
    loader = anydata.make_loader(test_set, args.batch_size, shuffle=False)
    with recorder.timed("eval"):
        result = evaluate_onnx(session, loader, quiet=args.quiet)
    recorder.data["metrics"] = {"onnx": result}
    path = recorder.write()
    print(format_table(["model", "top-1 %", "loss", "eval s"],
                       [["onnx (ONNX Runtime)", result["accuracy"], f"{result['loss']:.4f}", result["seconds"]]]))
    print(f"wrote {path}")
    return 0


def _check_ptq_bits(model, bits: list[int]) -> None:
    missing = [b for b in bits if mixed.needs_calibration(model, [b])]
    if missing:
        raise CLIError(f"this checkpoint was calibrated by anybit ptq; its activations have no calibrated range at "
                       f"{missing} bits. Evaluate it as saved (leave out --bits), evaluate a bit map from anybit "
                       f"mixed (--bit-map, calibrated here), or calibrate those bit-widths with anybit ptq")


def eval_out_dir(args: argparse.Namespace, inputs: tuple | None = None) -> Path:
    """Where eval writes: CHECKPOINT_DIR/eval (each eval replaces the last), or ``--out``, which must not
    be the checkpoint's directory nor hold another command's output (the one output guard: locked while
    eval writes, the previous eval kept until this one completes)."""
    own = list(inputs or checkpoint_paths(args.checkpoint))
    inputs = [*own, *data_inputs(args.data_dir)]
    if args.bit_map:
        inputs.append(args.bit_map)
    if not args.out:
        default = Path(own[0]).parent / "eval"
        return prepare_out_dir(default, overwrite=True, inputs=inputs, command="eval", own_only=True,
                               what=f"eval's output directory {default} (choose another with --out)")
    return prepare_out_dir(args.out, overwrite=True, inputs=inputs, command="eval", own_only=True)


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
