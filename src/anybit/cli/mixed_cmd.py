"""``anybit mixed``: a bit-width per layer under a size or BOPs budget, by integer programming."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import warnings
from pathlib import Path

import anybit
from anybit import data as anydata
from anybit import mixed, ptq
from anybit.checkpoint import checkpoint_paths, write_json
from anybit.evaluation import evaluate
from anybit.quant import (
    DEFAULT_KEEP_FIRST_LAST,
    FLOAT_BITS,
    QuantSpec,
    check_bits,
    check_layers_run,
    precision,
    quant_layers,
)
from anybit.report import RunRecorder, format_table

from .common import (
    load_split,
    MIXED_CALIB_SIZE,
    CLIError,
    add_data_args,
    bits_int,
    check_model_fits,
    data_inputs,
    data_source,
    fraction,
    non_empty,
    finite_float,
    add_data_option_arg,
    add_run_args,
    add_test_subset_arg,
    positive_int,
    prepare_out_dir,
    resolve_device,
    seed_everything,
    subset_of,
)
from .eval_cmd import dataset_from_metadata

SETUPS = ("auto", "none", "minmax")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "mixed", help="allocate a bit-width per layer under a size or BOPs budget (integer programming)",
        description="Measure every layer's sensitivity at each bit-width on calibration data, choose the "
                    "bit-width per layer with the least predicted loss within a budget (an integer program "
                    "solved by HiGHS), apply it, evaluate it on the test split, and write OUT/bitmap.json "
                    "(for anybit eval --bit-map and export) and OUT/run.json. With --sweep, also a Pareto "
                    "table (CSV, Markdown) and plot against uniform bit-widths.",
    )
    p.add_argument("run", metavar="RUN", help="checkpoint or run directory (anything anybit.load reads)")
    p.add_argument("--budget", type=fraction,
                   help="budget as a fraction of the float model's weight bits (--metric size) or BOPs "
                        "(--metric bops), e.g. 0.15")
    p.add_argument("--metric", choices=mixed.METRICS, default="size",
                   help="what the budget limits: weight size in bits or bit operations (default: %(default)s)")
    p.add_argument("--sweep", metavar="START:STOP:STEP",
                   help="also solve and evaluate a range of budgets, e.g. 0.10:0.30:0.02, for a Pareto curve")
    p.add_argument("--options", type=non_empty, default="2,3,4,8",
                   help="bit-widths to choose from (default: %(default)s)")
    p.add_argument("--a-bits", type=bits_int,
                   help="fix activation bits for every option (default: activations follow the weight bits)")
    p.add_argument("--objective", choices=("loss", "cost"), default="loss",
                   help="loss: least predicted loss within --budget; cost: least cost with predicted loss "
                        "increase at most --max-loss (default: %(default)s)")
    p.add_argument("--max-loss", type=finite_float,
                   help="largest predicted loss increase (with --objective cost)")
    p.add_argument("--solver", choices=("ip", "greedy"), default="ip",
                   help="integer program or the greedy baseline (default: %(default)s)")
    p.add_argument("--candidates", type=positive_int, default=1, metavar="K",
                   help="measure the integer program's K best allocations on the calibration data and keep the "
                        "one with the lowest measured loss (one calibration pass each; --budget only) "
                        "(default: %(default)s, the integer program's optimum)")
    p.add_argument("--loss", choices=("kl", "ce"), default="kl",
                   help="sensitivity loss: KL to the float model's outputs, or cross-entropy with labels "
                        "(default: %(default)s)")
    p.add_argument("--setup", choices=SETUPS, default="auto",
                   help="per-layer calibration for each option: none (multi-bit networks run at any bit-width "
                        "as they are), minmax (activation ranges from min/max, for post-training quantization), "
                        "auto: minmax when the model has uncalibrated activation ranges (default: %(default)s)")
    p.add_argument("--calib-size", type=positive_int,
                   help=f"calibration samples from the train split (default: {MIXED_CALIB_SIZE}, or the whole split if "
                        f"it is smaller)")
    add_test_subset_arg(p)
    p.add_argument("--pin-first-last", type=bits_int, default=DEFAULT_KEEP_FIRST_LAST,
                   help="for a float checkpoint (converted here, per-channel asymmetric weights): bit-width of "
                        "the first and last layer, which the allocation leaves alone (default: %(default)s)")
    p.add_argument("--cache", type=non_empty,
                   help="sensitivity cache file (default: RUN_DIR/mixed-cache/sensitivity-<settings>.json)")
    p.add_argument("--no-cache", action="store_true", help="measure sensitivities again and do not cache them")
    add_data_args(p)
    add_data_option_arg(p, "default: the options the checkpoint records")
    add_run_args(p)
    p.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> dict:
    if args.budget is None and args.sweep is None and args.objective == "loss":
        raise CLIError("give --budget (e.g. --budget 0.15) or --sweep START:STOP:STEP (e.g. 0.10:0.30:0.02)")
    if args.objective == "cost" and args.max_loss is None:
        raise CLIError("--objective cost needs --max-loss, the largest predicted loss increase allowed")
    if args.max_loss is not None and args.objective != "cost":
        raise CLIError("--max-loss applies to --objective cost only")
    if args.solver == "greedy" and args.objective == "cost":
        raise CLIError("--solver greedy minimises the loss within --budget; use --solver ip with --objective cost")
    if args.candidates > 1 and args.budget is None and args.objective == "loss":
        raise CLIError("--candidates re-ranks the allocations for one --budget; it does not apply to --sweep "
                       "alone: add --budget F or drop --candidates")
    if args.candidates > 1 and args.solver == "greedy":
        raise CLIError("--candidates re-ranks the integer program's best allocations; it does not apply to "
                       "--solver greedy")
    if args.cache and args.no_cache:
        raise CLIError("--cache and --no-cache contradict each other: choose one")
    if args.cache and (Path(args.cache).is_dir() or not Path(args.cache).resolve().parent.is_dir()):
        raise CLIError(f"--cache {args.cache} must be a file path in an existing directory (the sensitivity "
                       f"cache, JSON), not a directory")
    try:
        sweep = mixed.parse_sweep(args.sweep) if args.sweep is not None else []
    except mixed.MixedPrecisionError as e:
        raise CLIError(f"--{e}") from None
    if any(b > 1 for b in sweep):
        raise CLIError(f"--sweep {args.sweep} goes above 1 (the float model's cost); keep budgets in (0, 1]")
    if args.a_bits is not None:
        check_bits(args.a_bits, "--a-bits")
    try:
        options = mixed.resolve_options(args.options, args.a_bits)
    except ValueError as e:
        raise CLIError(f"--options {args.options!r}: {e}") from None
    check_bits(args.pin_first_last, "--pin-first-last")
    return {"sweep": sweep, "options": options}


def _cache_path(args: argparse.Namespace, options, dataset: str, setup_name: str, out: Path) -> Path | None:
    if args.no_cache:
        return None
    if args.cache:
        return Path(args.cache)
    key = json.dumps({"options": options, "loss": args.loss, "calib": args.calib_size, "seed": args.seed,
                      "dataset": dataset, "setup": setup_name, "pin": args.pin_first_last}, sort_keys=True)
    run_dir = checkpoint_paths(args.run)[0].parent
    folder = run_dir / "mixed-cache"       # created when the sensitivity is written, not before
    if not (folder.is_dir() and os.access(folder, os.W_OK)) and not os.access(run_dir, os.W_OK):
        folder = out
    return folder / f"sensitivity-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


def _float_run(meta: dict) -> bool:
    """A training run whose network was trained at 32 bits only: a float model (converted here for PTQ)."""
    trained = meta.get("metadata", {}).get("bits_trained")
    return bool(trained) and all(b >= FLOAT_BITS for b in trained)


def _check_allocatable(meta: dict, run) -> None:
    """A dedicated run with several bit-widths holds one model per bit-width, none of which runs at mixed
    precisions; an emqnet run trained at 32 bits only has float layers that clip their inputs, which a
    post-training conversion cannot reproduce. A run trained at 32 bits only is a float model: it is
    converted here like any float checkpoint."""
    info = meta.get("metadata", {})
    if info.get("method") == "dedicated" and not _float_run(meta):
        raise CLIError(f"{run} is a dedicated run (one model per bit-width, each trained at one): its networks were "
                       f"never trained to run at mixed bit-widths. Quantize one after training with a budget instead: "
                       f"anybit ptq {run} --pipeline light --budget F --out OUT")
    if _float_run(meta) and info.get("method") == "emqnet":
        raise CLIError(f"{run} was trained with emqnet at 32 bits only: its float layers clip their inputs, which a "
                       f"post-training conversion cannot reproduce. Train a float model with anybit train --method "
                       f"dedicated --bits 32, or train emqnet with low bit-widths (a multi-bit network)")


def _load_model(args: argparse.Namespace, device, meta: dict):
    model = anybit.load(args.run).to(device).eval()
    converted_here = False
    if _float_run(meta) and quant_layers(model):
        model = ptq.float_copy(model).eval()     # its 32-bit layers, as plain float layers
    if not quant_layers(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            anybit.convert(model, QuantSpec(weight="asymmetric", weight_per_channel=True,
                                            keep_first_last=args.pin_first_last))
        converted_here = True
    return model, converted_here


def _evaluate(model, loader, device, quiet, desc) -> dict:
    r = evaluate(model, loader, device, desc=desc, quiet=quiet)
    return {"accuracy": r["accuracy"], "loss": r["loss"], "samples": r["samples"]}


def _row(method: str, label: str, alloc: mixed.Allocation | None, result: dict, relative_cost: float,
         budget: float | None = None) -> dict:
    return {"method": method, "label": label, "budget": budget, "relative_cost": relative_cost,
            "predicted_loss": None if alloc is None else alloc.predicted_loss,
            "accuracy": result["accuracy"], "loss": result["loss"]}


def run(args: argparse.Namespace) -> int:
    checked = _validate(args)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    meta = anybit.read_metadata(args.run)
    _check_allocatable(meta, args.run)
    name, data_options = dataset_from_metadata(args, meta)
    out = prepare_out_dir(args.out, args.overwrite, inputs=[*checkpoint_paths(args.run), *data_inputs(args.data_dir)],
                          command="mixed")
    recorder = RunRecorder(out, "mixed", {
        "run": str(args.run), "budget": args.budget, "metric": args.metric, "sweep": checked["sweep"],
        "options": checked["options"], "objective": args.objective, "max_loss": args.max_loss,
        "solver": args.solver, "candidates": args.candidates, "loss": args.loss, "setup": args.setup,
        "calib_size": args.calib_size,
        "test_size": args.test_subset, "dataset": name, "dataset_options": data_options,
        "batch_size": args.batch_size, "seed": args.seed, "device": str(device)})

    with recorder.timed("load"):
        model, converted_here = _load_model(args, device, meta)
        train_set = load_split(name, "train", args.data_dir, data_options, augment=False)
        test_set = load_split(name, "test", args.data_dir, data_options)
        recorder.data["config"]["data_source"] = data_source(train_set, test_set)
        check_model_fits(model, test_set)
        calib = subset_of(train_set, args.calib_size, "--calib-size", args.seed, default=MIXED_CALIB_SIZE)
        args.calib_size = recorder.data["config"]["calib_size"] = len(calib)
        test_set = subset_of(test_set, args.test_subset, "--test-subset", args.seed)
        test_loader = anydata.make_loader(test_set, args.batch_size, shuffle=False)
        batches = mixed.calibration_batches(anydata.make_loader(calib, args.batch_size, shuffle=False),
                                            args.batch_size, device)
        left_float = check_layers_run(model, batches[0][0][:1])   # never counted as quantized

    options = checked["options"]
    act_bits = sorted({a for _, a in options})
    setup_name = args.setup
    if setup_name == "auto":
        setup_name = "minmax" if mixed.needs_calibration(model, act_bits) else "none"
    layer_setup = mixed.MinMaxSetup(batches) if setup_name == "minmax" else None
    if layer_setup is None and mixed.needs_calibration(model, act_bits):
        raise CLIError("this model's activation ranges were never learnt or calibrated (a float model converted "
                       "for post-training quantization); use --setup minmax (or auto)")
    cache = _cache_path(args, options, name, setup_name, out)
    recorder.data["config"].update({"setup": setup_name, "converted_here": converted_here,
                                    "left_float": left_float,
                                    "cache": None if cache is None else str(cache)})
    if not args.quiet:
        path = "post-training (min/max calibration per option)" if layer_setup else "multi-bit (no calibration)"
        print(f"model: {len(quant_layers(model))} quantizable layers, {path}"
              + (", converted from float here" if converted_here else ""))

    with recorder.timed("cost_model"):
        cost = mixed.cost_model(model, options, args.metric, batches[0][0][:1])
    if args.budget is not None:
        mixed.check_budget(cost, args.budget)  # before the (long) measurement
    with recorder.timed("sensitivity"):
        sens = mixed.sensitivity(model, batches, options, loss=args.loss, layer_setup=layer_setup,
                                 cache_path=cache, batch_size=args.batch_size, quiet=args.quiet)
    write_json(out / "sensitivity.json", {**sens.to_dict(), "cost": cost.to_dict()})
    recorder.data["metrics"]["sensitivity"] = {"from_cache": sens.from_cache, "seconds": sens.seconds,
                                               "reference_loss": sens.reference_loss, "samples": sens.samples}
    if not args.quiet:
        print(f"sensitivity of {len(sens.layers)} layers x {len(options)} options "
              + ("read from cache " if sens.from_cache else f"measured in {sens.seconds:.1f} s ")
              + ("" if cache is None else f"({cache})"))

    what = "weight size" if args.metric == "size" else "BOPs"
    if args.budget is not None or args.objective == "cost":
        with recorder.timed("solve"):
            if args.solver == "greedy":
                candidates = [mixed.allocate_greedy(sens, cost, args.budget)]
            else:
                candidates = mixed.allocate_best(sens, cost, args.budget, args.candidates, objective=args.objective,
                                                 max_loss=args.max_loss)
        alloc = candidates[0]
        if len(candidates) > 1:
            with recorder.timed("measure_candidates"):
                alloc = mixed.pick_measured(model, candidates, batches, loss=args.loss, layer_setup=layer_setup,
                                            batch_size=args.batch_size, quiet=args.quiet)
            if not args.quiet:
                print(_ranking_text(alloc))
        with recorder.timed("eval"):
            mixed.apply_allocation(model, alloc, layer_setup)
            result = _evaluate(model, test_loader, device, args.quiet, "eval allocation")
        mixed.save_bit_map(out / "bitmap.json", alloc)
        recorder.data["metrics"]["allocation"] = {**alloc.to_dict(), "test": result}
        rows = [[n, mixed.option_label(alloc.bit_map[n]), *(f"{sens.delta[i, k]:.4g}" for k in range(len(options)))]
                for i, n in enumerate(sens.layers)]
        if not args.quiet:
            print(format_table(["layer", "chosen", *(f"ΔL@{mixed.option_label(o)}" for o in options)], rows))
        print(f"{args.solver} allocation: {what} {alloc.relative_cost:.2%} of float"
              + (f" (budget {args.budget:.2%})" if args.budget is not None else "")
              + f", layers {alloc.counts()}, predicted ΔL {alloc.predicted_loss:.4f}, "
              f"test top-1 {result['accuracy']:.2f}% ({result['samples']} samples)")
        print(f"wrote {out / 'bitmap.json'}")

    if checked["sweep"]:
        with recorder.timed("sweep"):
            pareto = _sweep(args, model, sens, cost, layer_setup, test_loader, device, checked["sweep"], out)
        recorder.data["metrics"]["pareto"] = pareto
    path = recorder.write()
    print(f"wrote {path}")
    return 0


def _ranking_text(alloc: mixed.Allocation) -> str:
    rows = [[r["rank"], f"{r['predicted_loss']:.4f}", f"{r['measured_loss']:.4f}", f"{r['relative_cost']:.2%}",
             "<- kept" if r["chosen"] else ""] for r in alloc.ranking]
    return ("the integer program's best allocations, measured on the calibration data:\n"
            + format_table(["rank", "predicted ΔL", "measured loss", "size", ""], rows))


def _sweep(args, model, sens, cost, layer_setup, loader, device, budgets, out: Path) -> dict:
    rows = []
    with precision(model, FLOAT_BITS):
        float_result = _evaluate(model, loader, device, args.quiet, "eval float")
    for option in sens.options:
        alloc = mixed.uniform_allocation(sens, cost, option)
        mixed.apply_allocation(model, alloc, layer_setup)
        result = _evaluate(model, loader, device, args.quiet, f"eval uniform {mixed.option_label(option)}")
        rows.append(_row("uniform", f"W{option[0]}A{option[1]}", alloc, result, alloc.relative_cost))
    allocs, skipped = mixed.sweep(sens, cost, budgets, method=args.solver)
    (out / "bitmaps").mkdir(exist_ok=True)
    for alloc in allocs:
        mixed.apply_allocation(model, alloc, layer_setup)
        result = _evaluate(model, loader, device, args.quiet, f"eval budget {alloc.relative_budget:.3f}")
        mixed.save_bit_map(out / "bitmaps" / f"budget-{alloc.relative_budget:.4f}.json", alloc)
        counts = " ".join(f"{k}:{v}" for k, v in alloc.counts().items())
        rows.append(_row(args.solver, counts, alloc, result, alloc.relative_cost, alloc.relative_budget))
    title = f"{anybit.read_metadata(args.run).get('model', {}).get('arch', 'model')}: top-1 vs {args.metric}"
    paths = mixed.write_pareto(out, rows, args.metric, title, float_result["accuracy"])
    print(mixed.pareto_markdown(rows, args.metric))
    for b, reason in skipped:
        print(f"budget {b:.4f} skipped: {reason}")
    print(f"wrote {paths['csv']}, {paths['md']}, {paths['png']}")
    return {"float": float_result, "rows": rows, "skipped": [{"budget": b, "reason": r} for b, r in skipped],
            "files": {k: str(v) for k, v in paths.items()}}
