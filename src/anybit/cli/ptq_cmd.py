"""``anybit ptq``: post-training quantization of a checkpoint on a small unlabeled calibration set."""

from __future__ import annotations

import argparse
import sys
import time

import anybit
from anybit import data as anydata
from anybit import ptq
from anybit.checkpoint import checkpoint_paths
from anybit.evaluation import compare_outputs, evaluate
from anybit.quant import DEFAULT_KEEP_FIRST_LAST, check_bits
from anybit.report import RunRecorder, format_table

from .common import (
    load_split,
    CLIError,
    add_data_option_arg,
    add_run_args,
    bits_int,
    check_model_fits,
    data_inputs,
    data_source,
    fraction,
    non_empty,
    strict_int,
    add_test_subset_arg,
    non_negative_int,
    positive_int,
    prepare_out_dir,
    resolve_device,
    seed_everything,
    subset_of,
)
from .eval_cmd import dataset_from_metadata


def _bits_or_none(text: str) -> int | None:
    if text.lower() in ("none", "off", "no"):
        return None
    return strict_int(text, "a bit-width (1..16, 32) or 'none'")


CALIB_SIZE = 1000


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "ptq", help="post-training quantization: calibrate a trained model to low precision",
        description="Quantize a trained checkpoint without retraining: ranges by min/max or MSE search, "
                    "AdaQuant layer-wise calibration, BatchNorm tuning and bias tuning, on a small calibration "
                    "set from the train split (labels unused). Writes OUT/model.safetensors + OUT/model.json "
                    "(the quantized checkpoint) and OUT/run.json, and prints float vs quantized test accuracy. "
                    "A local Hugging Face model directory calibrates on text instead (--calib-text FILE, one "
                    "sample per line) and prints how closely the quantized model follows the float one.",
    )
    p.add_argument("checkpoint", help="run directory or checkpoint path (float, or converted: used at 32 bits), "
                                      "or a local Hugging Face model directory (config, weights, tokenizer)")
    p.add_argument("--calib-text", metavar="FILE",
                   help="Hugging Face models: calibration text, one sample per line (UTF-8)")
    p.add_argument("--test-text", metavar="FILE",
                   help="Hugging Face models: held-out text, one sample per line, to compare the quantized and "
                        "float outputs on (default: the calibration text)")
    p.add_argument("--max-length", type=positive_int, default=128,
                   help="Hugging Face models: tokens per sample, longer ones are truncated (default: %(default)s)")
    p.add_argument("--hf-class", default="AutoModel",
                   help="Hugging Face models: the transformers class that loads the directory, e.g. "
                        "AutoModelForSequenceClassification (default: %(default)s, the base model: its hidden "
                        "states are compared)")
    p.add_argument("--dataset", help="fashion-mnist, cifar10, cifar100, imagefolder or synthetic "
                                     "(default: the checkpoint's own)")
    p.add_argument("--data-dir", type=non_empty,
                   help="directory holding the dataset; when given, only it is used (default: $ANYBIT_DATA, then "
                        "system paths)")
    add_data_option_arg(p, "default: the options the checkpoint records")
    p.add_argument("--calib-size", type=positive_int,
                   help=f"calibration samples drawn from the train split (default: {CALIB_SIZE}, or the whole "
                        f"split if it is smaller); with --calib-text, lines of the file (default: 256, or all)")
    p.add_argument("--w-bits", type=bits_int, default=4, help="weight bits, 1..16 or 32 (default: %(default)s)")
    p.add_argument("--a-bits", type=bits_int, default=4, help="activation bits, 1..16 or 32 (default: %(default)s)")
    p.add_argument("--pipeline", choices=list(ptq.PIPELINES), default="advanced",
                   help="rtn: min/max ranges; mse: MSE ranges; adaquant: + AdaQuant; light: + bit allocation "
                        "+ BN tuning; advanced: + bit allocation + AdaQuant + BN tuning + bias tuning "
                        "(default: %(default)s)")
    p.add_argument("--keep-first-last", type=_bits_or_none, default=DEFAULT_KEEP_FIRST_LAST,
                   help="bits of the first and last layer, or 'none' to quantize them like the rest "
                        "(default: %(default)s)")
    p.add_argument("--adaquant-mode", choices=["sequential", "parallel"], default="sequential",
                   help="sequential: each layer sees the outputs of the quantized layers before it; "
                        "parallel: every layer sees float inputs (default: %(default)s)")
    p.add_argument("--iters", type=non_negative_int, default=ptq.PTQConfig.iters,
                   help="AdaQuant Adam steps per layer (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=ptq.PTQConfig.batch_size,
                   help="mini-batch of AdaQuant and bias tuning (default: %(default)s)")
    p.add_argument("--bias-iters", type=non_negative_int, default=ptq.PTQConfig.bias_iters,
                   help="bias tuning steps (default: %(default)s)")
    p.add_argument("--max-cache-mib", type=positive_int, default=ptq.PTQConfig.max_cache_bytes // 2**20,
                   help="largest AdaQuant cache of one layer's inputs and outputs, MiB (default: %(default)s)")
    p.add_argument("--budget", type=fraction,
                   help="light/advanced: allocate bits per layer by integer programming (anybit.mixed) within "
                        "this fraction of the float model's weight size (--metric size) or BOPs; without it "
                        "every layer runs at --w-bits/--a-bits")
    p.add_argument("--metric", choices=["size", "bops"], help="what --budget limits (default: size)")
    p.add_argument("--bit-options", type=non_empty, help="bit-widths --budget chooses from (default: 2,3,4,8)")
    add_test_subset_arg(p)
    p.add_argument("--eval-batch-size", type=positive_int, default=256, help="evaluation batch (default: %(default)s)")
    add_run_args(p)
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> ptq.PTQConfig:
    check_bits(args.w_bits, "--w-bits")
    check_bits(args.a_bits, "--a-bits")
    if args.keep_first_last is not None:
        check_bits(args.keep_first_last, "--keep-first-last")
    given = [flag for flag, value in (("--metric", args.metric), ("--bit-options", args.bit_options))
             if value is not None]
    if given and args.budget is None:
        raise CLIError(f"{' and '.join(given)}: only for the per-layer allocation of --budget; add --budget F "
                       f"or drop {' and '.join(given)}")
    args.metric = args.metric or "size"
    args.bit_options = "2,3,4,8" if args.bit_options is None else args.bit_options
    if args.budget is not None:
        if args.pipeline not in ("light", "advanced"):
            raise CLIError(f"--budget allocates bits in the light and advanced pipelines, not in {args.pipeline!r}")
        if not 0 < args.budget <= 1:
            raise CLIError(f"--budget {args.budget} must be a fraction of the float model's cost in (0, 1], e.g. 0.15")
    return ptq.PTQConfig(
        w_bits=args.w_bits, a_bits=args.a_bits, pipeline=args.pipeline, keep_first_last=args.keep_first_last,
        adaquant_mode=args.adaquant_mode, iters=args.iters, batch_size=args.batch_size, bias_iters=args.bias_iters,
        max_cache_bytes=args.max_cache_mib * 2**20, seed=args.seed,
    )


def _bit_allocator(args: argparse.Namespace):
    if args.budget is None:
        return None
    from anybit import mixed

    if not hasattr(mixed, "ptq_bit_allocator"):
        raise CLIError("this anybit has no bit allocator for PTQ (anybit.mixed.ptq_bit_allocator); drop --budget")
    try:
        options = mixed.resolve_options(args.bit_options)
    except ValueError as e:
        raise CLIError(f"--bit-options {args.bit_options!r}: {e}") from None
    return mixed.ptq_bit_allocator(args.budget, args.metric, options)


CALIB_TEXT_SIZE = 256


def _is_hf_dir(path: str) -> bool:
    from anybit.models import hf

    sidecar = checkpoint_paths(path)[1]
    return hf.is_model_dir(path) and not sidecar.is_file()


def run(args: argparse.Namespace) -> int:
    config = _config(args)
    allocator = _bit_allocator(args)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    text_flags = [f for f, v in (("--calib-text", args.calib_text), ("--test-text", args.test_text)) if v]
    if args.calib_text or _is_hf_dir(args.checkpoint):
        return run_text(args, config, allocator, device)
    if text_flags:
        raise CLIError(f"{' and '.join(text_flags)}: only for Hugging Face model directories; {args.checkpoint} "
                       f"is an anybit checkpoint, calibrated on --dataset")
    meta = anybit.read_metadata(args.checkpoint)
    name, data_options = dataset_from_metadata(args, meta)
    out = prepare_out_dir(args.out, args.overwrite, inputs=[*checkpoint_paths(args.checkpoint),
                                                            *data_inputs(args.data_dir)], command="ptq")
    model = anybit.load(args.checkpoint)
    ptq.check_quantizable(model)
    train_set = load_split(name, "train", args.data_dir, data_options, augment=False)
    test_set = load_split(name, "test", args.data_dir, data_options)
    check_model_fits(model, test_set)
    calib = subset_of(train_set, args.calib_size, "--calib-size", args.seed, default=CALIB_SIZE)
    args.calib_size = len(calib)
    test_set = subset_of(test_set, args.test_subset, "--test-subset", args.seed)

    recorder = RunRecorder(out, "ptq", {
        "checkpoint": str(args.checkpoint), "dataset": name, "dataset_options": data_options,
        "data_source": data_source(train_set, test_set),
        "calib_size": args.calib_size, "test_size": len(test_set), "device": str(device), "budget": args.budget,
        "metric": args.metric if args.budget is not None else None, **config.to_dict()})
    model = model.to(device)
    qmodel, report = _calibrate(args, model, calib, config, allocator, device, recorder)
    loader = anydata.make_loader(test_set, args.eval_batch_size, shuffle=False)
    with recorder.timed("eval"):
        float_result = evaluate(ptq.float_copy(model), loader, device, desc="eval float", quiet=args.quiet)
        quant_result = evaluate(qmodel, loader, device, desc="eval quantized", quiet=args.quiet)

    if args.budget is not None:
        label = f"mixed, {args.budget:.0%} of float {args.metric}"
    else:
        label = f"W{config.w_bits}A{config.a_bits}" + ("" if config.keep_first_last is None
                                                       else f" (first/last {config.keep_first_last})")
    ptq_meta = {"pipeline": report.pipeline, "w_bits": config.w_bits, "a_bits": config.a_bits,
                "keep_first_last": config.keep_first_last, "adaquant_mode": config.adaquant_mode,
                "calib_size": args.calib_size, "source": str(args.checkpoint), "budget": args.budget}
    path = anybit.save(qmodel, out / "model", data={"dataset": name, "options": data_options}, ptq=ptq_meta,
                       test_accuracy=quant_result["accuracy"])
    recorder.data["metrics"] = {
        "float": float_result, "quantized": quant_result, "kl": report.kl,
        "calibration_seconds": report.calibration_seconds, "layers": report.layers,
        "stages": report.stages, "precision": report.precision, "graph": report.graph,
    }
    run_json = recorder.write()
    rows = [["float", "32/32", float_result["accuracy"], f"{float_result['loss']:.4f}"],
            [f"{args.pipeline}", label, quant_result["accuracy"], f"{quant_result['loss']:.4f}"]]
    print(format_table(["model", "bits (W/A)", "top-1 %", "loss"], rows))
    stages = ", ".join(f"{s['name']} {s['seconds']:.1f}s" for s in report.stages)
    print(f"calibration on {args.calib_size} samples: {report.calibration_seconds:.1f} s ({stages}); "
          f"test set: {quant_result['samples']} samples")
    print(f"wrote {path} and {run_json}")
    return 0


def run_text(args: argparse.Namespace, config: ptq.PTQConfig, allocator, device) -> int:
    """``anybit ptq DIR --calib-text FILE``: a transformers model from a local directory, calibrated on text."""
    from anybit.models import hf

    if not args.calib_text:
        raise CLIError(f"{args.checkpoint} is a Hugging Face model directory: give its calibration text with "
                       f"--calib-text FILE (one sample per line)")
    image_flags = [f for f, v in (("--dataset", args.dataset), ("--data-dir", args.data_dir),
                                  ("--data-option", args.data_option), ("--test-subset", args.test_subset)) if v]
    if image_flags:
        raise CLIError(f"{', '.join(image_flags)}: for anybit checkpoints and image datasets; a Hugging Face model "
                       f"calibrates on --calib-text and is compared on --test-text")
    if args.hf_class not in hf.AUTO_CLASSES:
        raise CLIError(f"--hf-class {args.hf_class!r} is unknown: expected one of {', '.join(hf.AUTO_CLASSES)}")
    path = hf.check_model_dir(args.checkpoint, tokenizer=True)
    texts = anydata.read_lines(args.calib_text)
    test_texts = anydata.read_lines(args.test_text) if args.test_text else None
    size = args.calib_size if args.calib_size is not None else min(CALIB_TEXT_SIZE, len(texts))
    if size > len(texts):
        raise CLIError(f"--calib-size {size} is larger than {args.calib_text} ({len(texts)} lines): use at most "
                       f"{len(texts)}, or leave --calib-size out")
    out = prepare_out_dir(args.out, args.overwrite, inputs=(path, args.calib_text))
    tokenizer = hf.load_tokenizer(path)
    model = hf.load_pretrained(path, args.hf_class).to(device)
    calib = anydata.text_calibration(texts, tokenizer, max_length=args.max_length,
                                     num_samples=size if size < len(texts) else None, seed=args.seed)
    test = (anydata.text_calibration(test_texts, tokenizer, max_length=args.max_length) if test_texts is not None
            else calib)
    recorder = RunRecorder(out, "ptq", {
        "model_dir": str(path), "hf_class": type(model).__name__, "calib_text": str(args.calib_text),
        "calib_size": size, "test_text": str(args.test_text) if args.test_text else None,
        "test_size": len(test_texts) if test_texts is not None else size, "max_length": args.max_length,
        "device": str(device), "budget": args.budget, "metric": args.metric if args.budget is not None else None,
        **config.to_dict()})
    qmodel, report = _calibrate(args, model, calib, config, allocator, device, recorder)
    with recorder.timed("eval"):
        agreement = compare_outputs(qmodel, model, test, device=device)
    ptq_meta = {"pipeline": report.pipeline, "w_bits": config.w_bits, "a_bits": config.a_bits,
                "keep_first_last": config.keep_first_last, "adaquant_mode": config.adaquant_mode,
                "calib_size": size, "calib_text": str(args.calib_text), "source": str(path), "budget": args.budget}
    saved = anybit.save(qmodel, out / "model", ptq=ptq_meta, agreement=agreement)
    recorder.data["metrics"] = {
        "agreement": agreement, "output": report.output, "kl": report.kl,
        "calibration_seconds": report.calibration_seconds, "layers": report.layers, "stages": report.stages,
        "precision": report.precision, "graph": report.graph}
    run_json = recorder.write()
    label = (f"mixed, {args.budget:.0%} of float {args.metric}" if args.budget is not None else
             f"W{config.w_bits}A{config.a_bits}" + ("" if config.keep_first_last is None
                                                    else f" (first/last {config.keep_first_last})"))
    where = "held-out" if test_texts is not None else "calibration"
    if agreement["output"] == "hidden":
        headers = ["model", "bits (W/A)", f"embedding cosine to float ({where})", "relative error"]
        row = [args.pipeline, label, f"{agreement['cosine']:.4f}", f"{agreement['relative_error']:.4g}"]
    else:
        headers = ["model", "bits (W/A)", f"top-1 agreement % ({where})", "KL to float"]
        top1 = agreement["top1_agreement"]
        row = [args.pipeline, label, "-" if top1 is None else f"{top1:.2f}", f"{agreement['kl']:.4g}"]
    print(format_table(headers, [row]))
    stages = ", ".join(f"{s['name']} {s['seconds']:.1f}s" for s in report.stages)
    print(f"calibration on {size} texts: {report.calibration_seconds:.1f} s ({stages}); compared on "
          f"{agreement['samples']} {where} texts")
    print(f"wrote {saved} and {run_json}; load it with anybit.load(OUT, model=transformers.{type(model).__name__}"
          f".from_pretrained(DIR))")
    return 0


def _calibrate(args, model, calib, config, allocator, device, recorder):
    """``ptq.quantize`` with one line per finished stage on stderr (also when it is not a terminal) and
    each stage's time in run.json."""
    started = time.perf_counter()

    def stage_done(name: str, _model) -> None:
        if not args.quiet:
            print(f"{name} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    with recorder.timed("calibration"):
        qmodel, report = ptq.quantize(model, calib, config=config, bit_allocator=allocator, device=device,
                                      quiet=args.quiet, on_stage_end=stage_done)
    for stage in report.stages:
        recorder.data["timings_s"][f"stage.{stage['name']}"] = stage["seconds"]
    return qmodel, report
