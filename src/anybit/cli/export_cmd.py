"""``anybit export``: write a checkpoint at a chosen precision as packed integer weights or QDQ ONNX."""

from __future__ import annotations

import argparse

import torch

import anybit
from anybit import data as anydata
from anybit import mixed
from anybit.checkpoint import checkpoint_paths
from anybit.quant import FLOAT_BITS, parse_bit_list
from anybit.report import RunRecorder, format_table
from anybit.train import nearest_bits

from .common import (
    MIXED_CALIB_SIZE,
    CLIError,
    add_data_option_arg,
    add_device_args,
    check_model_fits,
    data_inputs,
    positive_int,
    prepare_out_dir,
    seed_everything,
    seed_int,
    subset_of,
)
from .eval_cmd import dataset_from_metadata


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a precision as packed integer weights or ONNX for ONNX Runtime",
        description="Export a checkpoint at one precision (--bits B, or a per-layer --bit-map from anybit mixed). "
                    "--format packed writes OUT/model.safetensors + OUT/model.json with every quantized weight as "
                    "integer codes packed at its bit-width (1..8); anybit.load and anybit eval read it and give "
                    "exactly the fake-quantized model's outputs. --bits with several bit-widths (e.g. 1-8 or "
                    "1-8,32) writes one package that serves each of them (anybit.load(OUT, bits=B)). --format onnx "
                    "writes OUT/model.onnx, a QuantizeLinear/DequantizeLinear graph that ONNX Runtime runs on its "
                    "integer kernels (anybit eval OUT --onnx).",
    )
    p.add_argument("checkpoint", help="run directory or checkpoint path")
    p.add_argument("--bits", help="bit-width to export (1..8 or 32; a list such as 1-8,32 for a package)")
    p.add_argument("--bit-map", metavar="FILE", help="export one per-layer bit map (bitmap.json from anybit mixed)")
    p.add_argument("--format", choices=["packed", "onnx"], default="packed", help="(default: %(default)s)")
    p.add_argument("--int4", action="store_true",
                   help="onnx: store weights whose codes fit in 4 bits as ONNX INT4 (smaller file; ONNX Runtime "
                        "runs them through float convolutions)")
    p.add_argument("--no-requantize", action="store_true",
                   help="onnx: leave out the 8-bit requantizations of outputs that feed residual adds; those layers "
                        "then run as float convolutions and the graph computes exactly what the PyTorch model does "
                        "(slower)")
    p.add_argument("--calib-size", type=positive_int,
                   help=f"onnx, and bit maps without calibrated ranges: training images for activation ranges "
                        f"(default: {MIXED_CALIB_SIZE})")
    p.add_argument("--dataset", help="dataset of the calibration images (default: the checkpoint's own)")
    p.add_argument("--data-dir", help="directory holding the dataset (default: $ANYBIT_DATA, then system paths)")
    add_data_option_arg(p, "default: the options the checkpoint records")
    p.add_argument("--batch-size", type=positive_int, default=64, help="calibration batch (default: %(default)s)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (default: %(default)s)")
    add_device_args(p)
    p.set_defaults(func=run)


def _parse(args: argparse.Namespace) -> list[int] | None:
    if (args.bits is None) == (args.bit_map is None):
        raise CLIError("give the precision to export: --bits B (a list for a package) or --bit-map FILE, not both"
                       if args.bits is not None else "give the precision to export: --bits B or --bit-map FILE")
    if args.bits is None:
        return None
    bits = parse_bit_list(args.bits)
    if args.format == "onnx" and len(bits) > 1:
        raise CLIError(f"--format onnx writes one precision; --bits {args.bits} names {len(bits)}. Export them one "
                       f"by one, or use --format packed for one package of all of them")
    wide = [b for b in bits if 8 < b < FLOAT_BITS]
    if wide and args.format == "packed":
        raise CLIError(f"--format packed stores codes of 1..8 bits or 32-bit floats, not {wide} bits")
    if args.int4 and args.format != "onnx":
        raise CLIError("--int4 applies to --format onnx; drop it")
    if args.no_requantize and args.format != "onnx":
        raise CLIError("--no-requantize applies to --format onnx; drop it")
    return bits


def run(args: argparse.Namespace) -> int:
    bits = _parse(args)
    meta = anybit.read_metadata(args.checkpoint)
    info = meta.get("metadata", {})
    members = info.get("members")
    if members and (bits is None or len(bits) > 1):
        raise CLIError("a dedicated run holds one model per bit-width; export one bit-width at a time (--bits B)")
    device = torch.device("cpu")   # exports are built and checked on the CPU
    seed_everything(args.seed)
    if members:
        member = nearest_bits(bits[0], sorted(int(b) for b in members))
        model = anybit.load(checkpoint_paths(args.checkpoint)[0].parent / members[str(member)])
    else:
        model = anybit.load(args.checkpoint)
    model.eval()
    bit_map = mixed.load_bit_map(args.bit_map, model) if args.bit_map else None
    name, options = dataset_from_metadata(args, meta)
    shape = anydata.dataset_info(name, **options)
    needs_data = args.format == "onnx" or (bit_map is not None and
                                          mixed.needs_calibration(model, {a for _, a in bit_map.values()}))
    inputs = [*checkpoint_paths(args.checkpoint), *data_inputs(args.data_dir)] + ([args.bit_map] if args.bit_map else [])
    out = prepare_out_dir(args.out, args.overwrite, inputs=inputs, command="export")
    recorder = RunRecorder(out, "export", {"checkpoint": str(args.checkpoint), "bits": bits, "bit_map": args.bit_map,
                                           "format": args.format, "int4": args.int4,
                                           "requantize": not args.no_requantize, "dataset": name,
                                           "options": options, "calib_size": args.calib_size})
    calib_loader = None
    calibrated = None
    if needs_data:
        with recorder.timed("data"):
            train = anydata.load(name, "train", data_dir=args.data_dir, augment=False, **options)
            calib = subset_of(train, args.calib_size, "--calib-size", args.seed, default=MIXED_CALIB_SIZE)
            calib_loader = anydata.make_loader(calib, args.batch_size, shuffle=False)
        check_model_fits(model, train)
        example = next(iter(calib_loader))[0][:8]
    else:
        generator = torch.Generator().manual_seed(args.seed)
        example = torch.randn(4, shape["in_channels"], shape["image_size"], shape["image_size"], generator=generator)
    if bit_map is not None and mixed.needs_calibration(model, {a for _, a in bit_map.values()}):
        mixed.prepare(model, bit_map, mixed.MinMaxSetup(calib_loader, device=device))
        calibrated = {"activation_ranges": "min/max", "samples": len(calib_loader.dataset)}
    metadata = {"source": str(args.checkpoint), "data": info.get("data", {"dataset": name, "options": options}),
                "method": info.get("method"), "bits_trained": info.get("bits_trained"),
                "calibrated": calibrated}
    with recorder.timed("export"):
        summary = anybit.export(model, out, bits=bits if bits is None or len(bits) > 1 else bits[0],
                                bit_map=bit_map, format=args.format, example_input=example,
                                calib_data=calib_loader, int4=args.int4, requantize=not args.no_requantize,
                                metadata=metadata)
    source_bytes = checkpoint_paths(args.checkpoint)[0].stat().st_size
    summary["checkpoint_bytes"] = source_bytes
    recorder.data["metrics"] = summary
    recorder.write()
    precision = f"bits {args.bits}" if bits is not None else f"bit map {args.bit_map}"
    rows = [[args.format, precision, summary["file_bytes"], source_bytes, f"{summary['file_bytes'] / source_bytes:.3f}"]]
    print(format_table(["format", "precision", "bytes", "checkpoint bytes", "ratio"], rows))
    if args.format == "packed":
        print(f"packed weights {summary['weight_bytes']} bytes = {summary['weights_vs_float_weights']:.3f} of the "
              f"float weights ({summary['float_weight_bytes']} bytes); everything else {summary['other_bytes']} bytes")
    else:
        layers = summary["layers"].values()
        integer = sum(v["kernel"] == "integer" for v in layers)
        shifted = sum(bool(v.get("weight_shift")) for v in layers)
        print(f"layers on integer kernels: {integer} of {len(summary['layers'])}; with weight bias correction's "
              f"per-channel shift (float convolutions): {shifted}; requantized outputs: {summary['requantized']}")
    print(f"wrote {', '.join(summary['files'])} and {out / 'run.json'}")
    return 0
