"""Deployment benchmark: file sizes and CPU latency of exported models, and ONNX Runtime's agreement with
the fake-quantized PyTorch model.

1. Agreement (Fashion-MNIST, 32x32): a ResNet-20 (width --width) trained briefly with emqnet, exported to
   ONNX at 8 and 4 bits; top-1 of the PyTorch fake-quantized model and of ONNX Runtime on the whole test
   set, their agreement and the largest logit difference; the PyTorch model with the ONNX file's int8
   weights (the weight bias correction shift rounded) against the exact one; packed files, the
   every-precision package and their sizes.
2. Latency (3x32x32 inputs): ResNet-20 (width 1) and torchvision resnet18, converted with per-channel
   symmetric weights (first and last layer too), activation ranges from random images: float PyTorch,
   float ONNX Runtime, int8 ONNX Runtime and 4-bit (INT4 weights) ONNX Runtime at batch 1 and 64, measured
   interleaved in one process so that every ratio comes from one run; file sizes of each.

    python benchmarks/deploy.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from common import (  # noqa: E402 - common puts src/ on the path
    add_common_args,
    apply_preset,
    command_line,
    fmt,
    markdown_table,
    write_markdown,
    write_results,
)

import anybit  # noqa: E402
from anybit.evaluation import evaluate, evaluate_onnx  # noqa: E402
from anybit.train import MultiBitTrainer, TrainConfig  # noqa: E402

QUICK = {"epochs": 3, "train_subset": 10000, "width": 0.5, "repeats": 15, "threads": 1, "calib": 512}
FULL = {"epochs": 30, "train_subset": 0, "width": 1.0, "repeats": 50, "threads": 1, "calib": 1024}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--epochs", type=int)
    p.add_argument("--train-subset", type=int, help="training images (0 = all)")
    p.add_argument("--width", type=float, help="width of the Fashion-MNIST ResNet-20")
    p.add_argument("--repeats", type=int, help="timed rounds per configuration")
    p.add_argument("--calib", type=int, help="calibration images for the ONNX exports")
    p.add_argument("--skip-agreement", action="store_true", help="latency and sizes only")
    return p.parse_args(argv)


def file_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file() and f.name != "run.json")


# ------------------------------------------------------------------------------------------ agreement
def agreement(args, tmp: Path) -> dict:
    torch.manual_seed(args.seed)
    train = anybit.data.load("fashion-mnist", "train", data_dir=args.data_dir)
    calib = anybit.data.load("fashion-mnist", "train", data_dir=args.data_dir, augment=False)
    test = anybit.data.load("fashion-mnist", "test", data_dir=args.data_dir)
    if args.train_subset:
        train, calib = train.subset(args.train_subset, seed=args.seed), calib.subset(args.train_subset, seed=args.seed)
    model = anybit.models.create("resnet20", width=args.width, in_channels=1)
    config = TrainConfig(bits=(1, 2, 4, 8, 32), method="emqnet", epochs=args.epochs, batch_size=64, lr=0.05,
                         distill="none", eval_every=0, seed=args.seed)
    t0 = time.perf_counter()
    trainer = MultiBitTrainer(model, train, test.subset(1000, seed=args.seed), config, quiet=True)
    trainer.fit()
    train_s = time.perf_counter() - t0
    model = trainer.models["all"].eval()
    calib_loader = anybit.data.make_loader(calib.subset(args.calib, seed=args.seed), 128, shuffle=False)
    test_loader = anybit.data.make_loader(test, 256, shuffle=False)
    example = next(iter(calib_loader))[0][:8]
    float_ckpt = tmp / "ckpt"
    anybit.save(model, float_ckpt / "model")
    out = {"train_s": train_s, "epochs": args.epochs, "width": args.width, "test_images": len(test),
           "checkpoint_bytes": file_size(float_ckpt), "bits": {}}
    for bits in (8, 4):
        anybit.set_precision(model, bits)
        path = tmp / f"fm-onnx{bits}"
        summary = anybit.export(model, path, bits=bits, format="onnx", example_input=example, calib_data=calib_loader)
        session = anybit.export.onnx_session(path, threads=args.threads)
        logits_pt, logits_ort = [], []
        with torch.no_grad():
            for images, _ in test_loader:
                logits_pt.append(model(images))
                logits_ort.append(session(images))
        pt, ort_ = torch.cat(logits_pt), torch.cat(logits_ort)
        labels = torch.as_tensor(test.targets)
        approx = anybit.export.with_onnx_weights(model)
        approx_acc = evaluate(approx, test_loader, quiet=True)["accuracy"]
        inexact = [v for v in summary["layers"].values() if v["w_bits"] < 32 and not v["exact"]]
        out["bits"][str(bits)] = {
            "pytorch_top1": 100.0 * (pt.argmax(1) == labels).float().mean().item(),
            "onnx_top1": 100.0 * (ort_.argmax(1) == labels).float().mean().item(),
            "agreement": 100.0 * (pt.argmax(1) == ort_.argmax(1)).float().mean().item(),
            "max_logit_diff": (pt - ort_).abs().max().item(),
            "logit_range": pt.abs().max().item(),
            "onnx_weights_top1": approx_acc,
            "requantized_outputs": summary["requantized"],
            "inexact_layers": len(inexact),
            "max_weight_error_steps": max((v["max_weight_error_steps"] for v in inexact), default=0.0),
            "onnx_bytes": file_size(path),
        }
        packed = anybit.export(model, tmp / f"fm-packed{bits}", bits=bits, example_input=example)
        out["bits"][str(bits)]["packed_bytes"] = packed["file_bytes"]
    anybit.set_precision(model, 8)
    for name, bits in (("package_1_8", list(range(1, 9))), ("package_1_8_32", list(range(1, 9)) + [32])):
        s = anybit.export(model, tmp / name, bits=bits, example_input=example)
        out[name] = {"bytes": s["file_bytes"], "weight_bytes": s["weight_bytes"]}
    singles = 0
    for b in list(range(1, 9)) + [32]:
        s = anybit.export(model, tmp / f"single{b}", bits=b, example_input=example)
        singles += s["file_bytes"]
    out["one_packed_file_per_precision_bytes"] = singles
    return out


# ------------------------------------------------------------------------------------------ latency
def _models():
    torch.manual_seed(0)
    yield "resnet20", anybit.models.create("resnet20", width=1.0, num_classes=10)
    yield "resnet18", torchvision.models.resnet18(num_classes=10)


def _time(fn, x, repeats: int, calls: int) -> float:
    """Median over ``repeats`` rounds of the mean time of ``calls`` calls (ms)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn(x)
        times.append((time.perf_counter() - t) / calls * 1000)
    return statistics.median(times)


def latency(args, tmp: Path) -> dict:
    results = {}
    for name, float_model in _models():
        float_model.eval()
        images = torch.rand(256, 3, 32, 32)
        anybit.save(float_model, tmp / f"{name}-float" / "model")
        model = anybit.convert(__import__("copy").deepcopy(float_model), weight="symmetric", act="fixed")
        model.eval()
        anybit.calibrate_activations(model, images)
        files = {"float_pytorch": file_size(tmp / f"{name}-float")}
        sessions = {}
        for label, bits, int4 in (("float_ort", 32, False), ("int8_ort", 8, False), ("int4_ort", 4, True)):
            path = tmp / f"{name}-{label}"
            anybit.export(model, path, bits=bits, format="onnx", example_input=images[:2], calib_data=images,
                          int4=int4)
            files[label] = file_size(path)
            sessions[label] = anybit.export.onnx_session(path, threads=args.threads)
        for bits in (8, 4):
            s = anybit.export(model, tmp / f"{name}-packed{bits}", bits=bits, example_input=images[:2])
            files[f"packed{bits}"] = s["file_bytes"]
            files[f"packed{bits}_weights_vs_float"] = s["weights_vs_float_weights"]
        row = {"files": files, "ms": {}}
        for batch, calls in ((1, 20), (64, 1)):
            x = torch.rand(batch, 3, 32, 32)
            runners = {"float_pytorch": lambda t: float_model(t)}
            runners.update({k: (lambda t, s=s: s.run(t.numpy())) for k, s in sessions.items()})
            with torch.no_grad():
                for fn in runners.values():   # warm-up
                    fn(x)
                    fn(x)
                rounds = {k: [] for k in runners}
                for _ in range(args.repeats):   # interleaved: every configuration sees the same machine load
                    for k, fn in runners.items():
                        rounds[k].append(_time(fn, x, 1, calls))
            row["ms"][str(batch)] = {k: statistics.median(v) for k, v in rounds.items()}
        results[name] = row
    return results


def markdown(report: dict) -> list[str]:
    lines = ["# Deployment: exported sizes, CPU latency, ONNX Runtime agreement", "",
             f"`{report['command']}` — {report['environment']['platform']}, {report['threads']} thread(s) for "
             f"PyTorch and ONNX Runtime, every configuration timed interleaved in one process (median of "
             f"{report['repeats']} rounds).", ""]
    lat = report["latency"]
    lines += ["## Latency and file size (3×32×32, per-channel symmetric weights, activations calibrated)", ""]
    rows = []
    for name, row in lat.items():
        ms, files = row["ms"], row["files"]
        for k in ("float_pytorch", "float_ort", "int8_ort", "int4_ort"):
            rows.append([name, k.replace("_", " "), fmt(ms["1"][k]), fmt(ms["64"][k]),
                         fmt(ms["64"]["float_pytorch"] / ms["64"][k]), files[k],
                         fmt(files[k] / files["float_pytorch"], ".3f")])
    lines += [markdown_table(["model", "runtime", "batch 1 ms", "batch 64 ms", "speed-up vs float PyTorch (64)",
                              "file bytes", "size vs float"], rows), ""]
    rows = [[name, row["files"]["float_pytorch"], row["files"]["packed8"], fmt(row["files"]["packed8"] /
             row["files"]["float_pytorch"], ".3f"), row["files"]["packed4"],
             fmt(row["files"]["packed4"] / row["files"]["float_pytorch"], ".3f"),
             fmt(row["files"]["packed4_weights_vs_float"], ".3f")] for name, row in lat.items()]
    lines += ["Packed files (`anybit export --format packed`):", "",
              markdown_table(["model", "float checkpoint bytes", "8-bit bytes", "ratio", "4-bit bytes", "ratio",
                              "4-bit weights / float weights"], rows), ""]
    agree = report.get("agreement")
    if agree:
        lines += [f"## ONNX Runtime against the fake-quantized PyTorch model (Fashion-MNIST, {agree['test_images']} "
                  f"test images)", "",
                  f"ResNet-20 width {agree['width']}, emqnet, {agree['epochs']} epochs ({agree['train_s']:.0f} s "
                  f"training), DoReFa weights with weight bias correction.", ""]
        rows = [[b, fmt(r["pytorch_top1"]), fmt(r["onnx_top1"]), fmt(r["agreement"]), fmt(r["max_logit_diff"], ".3f"),
                 fmt(r["logit_range"], ".2f"), fmt(r["onnx_weights_top1"]),
                 fmt(r["onnx_weights_top1"] - r["pytorch_top1"], "+.2f"), r["requantized_outputs"],
                 f"{r['inexact_layers']} ({fmt(r['max_weight_error_steps'], '.3f')})", r["onnx_bytes"],
                 r["packed_bytes"]]
                for b, r in agree["bits"].items()]
        lines += [markdown_table(["bits", "PyTorch top-1", "ORT top-1", "agreement %", "max |logit diff|",
                                  "max |logit|", "PyTorch with ONNX weights", "change", "requantized outputs",
                                  "inexact layers (max error, steps)", "onnx bytes", "packed bytes"], rows), ""]
        lines += [f"Every-precision package: 1..8 bits {agree['package_1_8']['bytes']} bytes, 1..8 + 32 bits "
                  f"{agree['package_1_8_32']['bytes']} bytes, against {agree['checkpoint_bytes']} bytes for the "
                  f"checkpoint and {agree['one_packed_file_per_precision_bytes']} bytes for one packed file per "
                  f"precision (1..8 and 32)."]
    return lines


def main(argv=None) -> int:
    args = apply_preset(parse(argv), QUICK, FULL)
    torch.set_num_threads(args.threads)
    report = {"command": command_line(__file__, argv), "mode": args.mode, "threads": args.threads,
              "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        report["latency"] = latency(args, tmp)
        if not args.skip_agreement:
            report["agreement"] = agreement(args, tmp)
    from anybit.report import environment

    report["environment"] = environment()
    path = write_results("deploy", report, args.tag)
    lines = markdown(report)
    if not args.no_doc:
        write_markdown("benchmarks-deploy.md", lines)
    print("\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
