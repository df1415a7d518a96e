"""``anybit train``: train one network for a list of bit-widths (dedicated, anyprecision, emqnet).

Under ``torchrun`` every process runs this command; rank 0 checks the output directory, writes and prints.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from anybit import data as anydata
from anybit import models
from anybit.models import MAX_WIDTH
from anybit.quant import BitsError, parse_bit_list
from anybit.train import CORESET_SCORES, DISTILL_CHOICES, METHOD_NAMES, MultiBitTrainer, TrainConfig
from anybit.train.config import (AMP_CHOICES, BN_STATS, BN_UNTRAINED, CORESET_STEPS, OPTIMIZERS, SCHEDULES,
                                 TrainConfigError)
from anybit.train.distributed import DistContext
from anybit.train.state import has_state, read_state_header
from anybit.train.trainer import check_same_config

from .common import (
    load_split,
    CLIError,
    add_data_args,
    add_data_option_arg,
    add_run_args,
    add_test_subset_arg,
    data_inputs,
    data_source,
    fraction,
    non_negative_float,
    non_negative_int,
    parse_data_options,
    positive_float,
    positive_int,
    prepare_out_dir,
    seed_everything,
    strict_int,
    subset_of,
    unit_interval,
)
from .distributed import add_distributed_args, auto_workers, start, workers_arg


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train one network for many bit-widths",
        description="Train one network for a list of bit-widths and write the checkpoint, run.json, log.csv "
                    "and accuracy.png into --out. Methods: emqnet (weight bias correction, shared BatchNorm, "
                    "bit-wise coreset), anyprecision (one BatchNorm per bit-width), dedicated (one model per "
                    "bit-width). Evaluates on the test split after each epoch.",
    )
    p.add_argument("--model", default="resnet20", help="architecture: resnet20/32/44/56, vit_tiny or "
                                                       "torchvision.<name> (default: %(default)s)")
    p.add_argument("--width", type=positive_float, default=1.0,
                   help=f"width multiplier: of the CIFAR ResNets' channels, of vit_tiny's embed_dim, up to "
                        f"{MAX_WIDTH:g} (default: 1)")
    p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                   help="model option, repeatable (vit_tiny: patch_size=7, embed_dim=96, depth=6, num_heads=3, "
                        "mlp_ratio=4, pool=cls); the classes, input channels and image size come from the dataset")
    add_data_args(p)
    add_data_option_arg(p, "synthetic: num_samples=512")
    p.add_argument("--train-subset", type=positive_int, help="train on a fixed random subset of N samples")
    add_test_subset_arg(p)
    p.add_argument("--bits", default="1,2,4,8,32", help="bit-widths to train (default: %(default)s)")
    p.add_argument("--method", default="emqnet", help=f"{', '.join(METHOD_NAMES)} (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=5, help="epochs (default: %(default)s)")
    p.add_argument("--optimizer", default="sgd", help=f"{', '.join(OPTIMIZERS)} (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, help="learning rate (default: 0.1 for sgd, 0.001 for adam)")
    p.add_argument("--momentum", type=unit_interval, default=0.9, help="SGD momentum (default: %(default)s)")
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    p.add_argument("--weight-decay", type=non_negative_float,
                   help="weight decay on weights (default: 5e-4 sgd, 0 adam)")
    p.add_argument("--schedule", default="cosine", help=f"{', '.join(SCHEDULES)} (default: %(default)s)")
    p.add_argument("--distill", help=f"{', '.join(DISTILL_CHOICES)} (default: recursive for anyprecision, none "
                                     f"for emqnet and dedicated)")
    p.add_argument("--label-smoothing", type=unit_interval, default=0.0,
                   help="on the top precision's labels (default: 0)")
    p.add_argument("--keep-first-last", default="32",
                   help="bit-width of the first and last layer, or 'none' to quantize them too (default: 32)")
    p.add_argument("--coreset-fraction", type=fraction,
                   help="share of the data each bit-width sees per epoch (default: 0.2 for emqnet; 1 = off)")
    p.add_argument("--coreset-score", default="random",
                   help=f"{', '.join(CORESET_SCORES)}: how each bit-width's subset is drawn; random = uniform, "
                        f"disjoint between bit-widths (default: %(default)s)")
    p.add_argument("--coreset-refresh", type=non_negative_int, default=0, metavar="R",
                   help="re-score every R epochs (default: 0, scored once)")
    p.add_argument("--coreset-warmup", type=non_negative_int, default=1, metavar="E",
                   help="epochs on random subsets before the first scoring: an untrained network's "
                        "scores say little (default: 1)")
    p.add_argument("--coreset-steps", choices=CORESET_STEPS,
                   help="subset: batches of --batch-size per bit-width, fewer steps per epoch; full: as many steps "
                        "as a full-data epoch, each bit-width's batch shrunk to fraction x --batch-size "
                        "(default: subset)")
    p.add_argument("--bn-stats", choices=BN_STATS,
                   help="emqnet: per-precision (BatchNorm affine terms shared, running statistics per trained "
                        "bit-width) or shared (one set for all) (default: per-precision)")
    p.add_argument("--bn-untrained", choices=BN_UNTRAINED, default="interpolate",
                   help="how per-precision statistics are derived, without data, for bit-widths not trained "
                        "(default: %(default)s)")
    p.add_argument("--final-bn-batches", type=non_negative_int, default=20, metavar="N",
                   help="after the last epoch, re-estimate BatchNorm statistics over N training batches per "
                        "bit-width, all bit-widths weighted equally; 0 = keep the momentum averages training "
                        "left (default: %(default)s)")
    p.add_argument("--eval-every", type=non_negative_int, default=1, metavar="E",
                   help="evaluate on the test split every E epochs; 0 = at the end only (default: 1)")
    p.add_argument("--workers", type=workers_arg, default="auto",
                   help="data-loading processes per training process; auto: 0 for datasets held in memory, "
                        "the process's cores less one (at most 8) for imagefolder (default: %(default)s)")
    p.add_argument("--amp", choices=AMP_CHOICES, default="off",
                   help="bf16: training passes at 4 bits or fewer under bf16 autocast (higher bit-widths, float, "
                        "scoring and evaluation stay float32); meant for CUDA (default: %(default)s)")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="networks and batches in channels-last memory format; auto: on CUDA (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    add_run_args(p)
    add_distributed_args(p)
    p.set_defaults(func=run)


_FLAGS = {"num_workers": "--workers"}


def flag_message(e: Exception) -> str:
    """A library message that starts ``field=value`` rewritten to name the command-line flag."""
    text = str(e)
    match = re.match(r"([a-z_]+)=", text)
    if match:
        field = match[1]
        flag = _FLAGS.get(field, "--" + field.replace("_", "-"))
        return f"{flag} {text[match.end():]}"
    return text


# Model arguments the dataset decides (and --width); --model-option may not set them.
_FROM_DATA = {"num_classes": "the dataset's classes", "in_channels": "the dataset's channels",
              "image_size": "the dataset's image size (--data-option image_size=N where the dataset takes it)",
              "width": "--width"}


def parse_model_options(args: argparse.Namespace) -> dict:
    """``--model-option KEY=VALUE`` as keyword arguments of the model's builder, checked against what it takes."""
    options = parse_data_options(args.model_option, "--model-option", "patch_size=7")
    taken = [k for k in options if k in _FROM_DATA]
    if taken:
        raise CLIError(f"--model-option {taken[0]} is not a model option here: it comes from {_FROM_DATA[taken[0]]}")
    accepted = models.parameters(args.model)   # raises UnknownModelError for an unknown name
    if accepted is not None:
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            allowed = [k for k in accepted if k not in _FROM_DATA]
            raise CLIError(f"--model-option {unknown[0]} is not an option of {args.model}: it takes "
                           f"{', '.join(allowed) if allowed else 'none'}")
    return options


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The training configuration from the command line, validated (raises before any work)."""
    keep = args.keep_first_last
    if str(keep).strip().lower() == "none":
        keep = None
    else:
        try:
            keep = strict_int(keep)
        except argparse.ArgumentTypeError:
            raise CLIError(f"--keep-first-last {keep!r} is not a bit-width (1..16, 32) or 'none'") from None
    try:
        bits = tuple(parse_bit_list(args.bits))
    except BitsError as e:
        raise CLIError(f"--bits: {e}") from None
    try:
        return TrainConfig(
            bits=bits, method=args.method, epochs=args.epochs, batch_size=args.batch_size,
            optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
            weight_decay=args.weight_decay, schedule=args.schedule, distill=args.distill,
            label_smoothing=args.label_smoothing, keep_first_last=keep, coreset_fraction=args.coreset_fraction,
            coreset_score=args.coreset_score, coreset_refresh=args.coreset_refresh,
            coreset_warmup=args.coreset_warmup, coreset_steps=args.coreset_steps, bn_stats=args.bn_stats,
            bn_untrained=args.bn_untrained, final_bn_batches=args.final_bn_batches, seed=args.seed,
            eval_every=args.eval_every, num_workers=args.workers, amp=getattr(args, "amp", "off"),
        ).resolved()
    except (TrainConfigError, BitsError) as e:
        raise CLIError(flag_message(e)) from None


def validate(args: argparse.Namespace, ctx: DistContext | None = None) -> tuple[TrainConfig, dict, dict]:
    """Check everything that can be checked without data: config, model, dataset, output directory (the
    output directory on rank 0 only: it is the one that writes)."""
    ctx = ctx or DistContext()
    if args.workers == "auto":
        args.workers = auto_workers(args.dataset, ctx.local_world_size)
    config = build_config(args)
    if not args.dataset:
        raise CLIError("--dataset is required: fashion-mnist, cifar10, cifar100, imagefolder or synthetic")
    options = parse_data_options(args.data_option)
    info = anydata.dataset_info(args.dataset, **options)
    model_options = parse_model_options(args)   # also refuses an unknown model name, with suggestions
    if args.width > MAX_WIDTH:
        raise CLIError(f"--width {args.width:g} is too wide: at most {MAX_WIDTH:g} (ResNet-20 at 16x has about 70 M "
                       f"parameters; Any-Precision's wide model is 5)")
    run_info = {"model": args.model, "width": args.width, "dataset": info["name"], "data_options": options,
                "train_subset": args.train_subset, "test_subset": args.test_subset}
    if model_options:
        run_info["model_options"] = model_options
    out = Path(args.out)
    if args.resume and args.overwrite:
        raise CLIError("--overwrite and --resume contradict each other: choose one")
    if not ctx.is_main:
        return config, run_info, info
    if args.resume:
        if not has_state(out):
            raise CLIError(f"--resume: {out} holds no interrupted run (no {out}/state/state.json); "
                           f"drop --resume to start a new run")
        saved = read_state_header(out)["state"]["config"]
        check_same_config({k: v for k, v in saved.items() if k != "sampler"},
                          {**run_info, **config.to_dict()})
    return config, run_info, info


def build_model(args: argparse.Namespace, info: dict, num_classes: int):
    """The float model named by --model, for the dataset's classes, channels and (where the model takes it)
    image size, with --width and --model-option."""
    kwargs = {"num_classes": num_classes, "in_channels": info["in_channels"]}
    accepted = models.parameters(args.model) or ()
    if "width" in accepted:
        kwargs["width"] = args.width
    if "image_size" in accepted:
        kwargs["image_size"] = info["image_size"]
    return models.create(args.model, **kwargs, **parse_model_options(args))


def run(args: argparse.Namespace) -> int:
    seed_everything(args.seed)
    ctx = start(args)   # under torchrun: this process's rank; else one process on --device
    try:
        return _train(args, ctx)
    finally:
        ctx.close()


def _train(args: argparse.Namespace, ctx: DistContext) -> int:
    with ctx.agreed("the set-up"):   # a mistake any rank finds stops every rank
        config, run_info, info = validate(args, ctx)
        # Built before any data is read, so that a bad model name or shape fails at once (imagefolder
        # learns its class count from the directory, so its model waits for the data).
        model = build_model(args, info, info["num_classes"]) if info["num_classes"] else None
        # only rank 0 opens (and locks) the output directory and writes to it
        out = (prepare_out_dir(args.out, args.overwrite, resume=args.resume, can_resume=True,
                               inputs=data_inputs(args.data_dir), command="train") if ctx.is_main
               else Path(args.out))

        t0 = time.perf_counter()
        options = run_info["data_options"]
        train_set = load_split(info["name"], "train", args.data_dir, options)
        test_set = load_split(info["name"], "test", args.data_dir, options)
        train_set = subset_of(train_set, args.train_subset, "--train-subset", args.seed)
        test_set = subset_of(test_set, args.test_subset, "--test-subset", args.seed)
        data_seconds = time.perf_counter() - t0
        if model is None:
            model = build_model(args, info, train_set.num_classes)

    trainer = MultiBitTrainer(
        model, train_set, test_set, config, out_dir=out, quiet=args.quiet,
        run_info={**run_info, "data_source": data_source(train_set, test_set)},
        data_info={"dataset": info["name"], "options": options, "train_subset": args.train_subset},
        distributed=ctx, channels_last=None if args.channels_last == "auto" else args.channels_last == "on",
    )
    if not args.resume:
        trainer.add_time("data", data_seconds)
    show = ctx.is_main
    if show and not args.quiet:
        print(f"training {args.model} on {info['name']} ({len(train_set)} samples) for bits "
              f"{','.join(map(str, sorted(config.bits)))} with {config.method}, {config.epochs} epochs"
              + (f", {ctx.world_size} processes ({ctx.backend}), {config.batch_size // ctx.world_size} samples "
                 f"per process and step" if ctx.enabled else "")
              + (f", resuming after epoch {trainer.check_resumable()}" if args.resume else ""))
    trainer.fit(resume=args.resume)
    if not show:
        return 0
    print(trainer.summary_table())
    print(f"test top-1 on {len(test_set)} test images" + (f" (a fixed --test-subset; anybit eval {out} "
          f"--test-subset {args.test_subset} measures the same ones, without it the whole test split)"
          if args.test_subset else ""))
    print(f"wrote {out}/model.safetensors, run.json, log.csv, accuracy.png "
          f"({trainer.timings.get('fit', 0.0):.1f} s training)")
    return 0
