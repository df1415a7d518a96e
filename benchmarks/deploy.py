"""Deployment benchmark: file sizes and CPU latency of exported models, and ONNX Runtime's agreement with
the fake-quantized PyTorch model.

1. Agreement (Fashion-MNIST, 32x32, the whole test set): an emqnet ResNet-20 trained as the README's main
   job does (or the run given by --checkpoint), exported to ONNX at 8, 4 and 2 bits: top-1 of PyTorch and
   of ONNX Runtime, their agreement, the largest logit difference, and the top-1 of the PyTorch model with
   the weights the ONNX file holds. The same network on the grids ONNX Runtime's integer kernels take
   (per-channel symmetric weights, no weight bias correction) at 8 and 4 bits (at 2 bits these untrained
   ternary weights leave one class), exported with and without the requantization of the outputs that
   feed residual adds. Packed files and their codes,
   every-precision packages.
2. Latency (3x32x32 inputs): ResNet-20 (width 1) and torchvision resnet18, converted with per-channel
   symmetric weights (first and last layer too), activation ranges from random images: float PyTorch,
   float ONNX Runtime, int8 and 4-bit (INT4 weights) ONNX Runtime, and the same networks with emqnet's
   weights (DoReFa, weight bias correction) at 8 bits, at batch 1 and 64, at every --latency-threads
   setting, every configuration timed interleaved in one process so that every ratio comes from one run;
   file sizes of each; ONNX Runtime's own profile of the int8 ResNet-20 at batch 64.

    python benchmarks/deploy.py --quick
    python benchmarks/deploy.py --quick --checkpoint runs/default     # reuse a trained run
"""

from __future__ import annotations

import os

# interleaved timing: a thread pool that spins after a call takes a core from the next configuration, so
# neither PyTorch's (OpenMP, set before torch loads) nor ONNX Runtime's pools spin
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import collections  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402

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
from anybit.evaluation import evaluate  # noqa: E402
from anybit.quant import WeightQuantizer, quant_layers  # noqa: E402
from anybit.train import MultiBitTrainer, TrainConfig  # noqa: E402

# the README's main job: emqnet, 8 epochs on 10 000 images, batch 64, lr 0.05, no distillation
# --quick times one thread, 10 rounds: on a small machine shared with other work a second thread measures
# that work more than the runtimes (--latency-threads 1,2 adds it). Most of --quick's time is training the
# agreement model (--checkpoint reuses a trained run; --skip-agreement leaves it out)
QUICK = {"epochs": 8, "train_subset": 10000, "width": 0.5, "repeats": 10, "threads": 1, "calib": 512,
         "latency_threads": "1"}
FULL = {"epochs": 30, "train_subset": 0, "width": 1.0, "repeats": 50, "threads": 1, "calib": 1024,
        "latency_threads": "1,2"}
AGREEMENT_BITS = (8, 4, 2)
INTEGER_BITS = (8, 4)   # untrained 2-bit symmetric (ternary) weights collapse the network to one class
TARGETS = {"speedup": 3.0, "packed4": 0.13, "agreement": 99.5, "wbc_change": 0.05}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--epochs", type=int)
    p.add_argument("--train-subset", type=int, help="training images (0 = all)")
    p.add_argument("--width", type=float, help="width of the Fashion-MNIST ResNet-20")
    p.add_argument("--checkpoint", help="a trained emqnet run to measure instead of training one")
    p.add_argument("--repeats", type=int, help="timed rounds per configuration")
    p.add_argument("--latency-threads", help="thread counts timed, e.g. 1,2")
    p.add_argument("--calib", type=int, help="calibration images for the ONNX exports")
    p.add_argument("--skip-agreement", action="store_true", help="latency and sizes only")
    p.add_argument("--skip-latency", action="store_true", help="agreement and sizes only")
    return p.parse_args(argv)


def file_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file() and f.name != "run.json")


def float_checkpoint_bytes(model: torch.nn.Module, tmp: Path, name: str) -> int:
    """Bytes of an anybit checkpoint of the float model (what the exports are compared with)."""
    anybit.save(model, tmp / name / "model")
    return file_size(tmp / name)


def packed_sizes(summary: dict, float_bytes: int) -> dict:
    return {"bytes": summary["file_bytes"], "codes": summary["weight_bytes"], "other": summary["other_bytes"],
            "vs_float": summary["file_bytes"] / float_bytes, "codes_vs_float": summary["weight_bytes"] / float_bytes}


# ------------------------------------------------------------------------------------------ agreement
def trained_model(args, train, test, tmp: Path) -> tuple[torch.nn.Module, dict]:
    if args.checkpoint:
        model = anybit.load(args.checkpoint).eval()
        anybit.save(model, tmp / "ckpt" / "model")
        return model, {"checkpoint": args.checkpoint, "train_s": None, "checkpoint_bytes": file_size(tmp / "ckpt")}
    torch.manual_seed(args.seed)
    model = anybit.models.create("resnet20", width=args.width, in_channels=1)
    config = TrainConfig(bits=(1, 2, 4, 8, 32), method="emqnet", epochs=args.epochs, batch_size=64, lr=0.05,
                         distill="none", eval_every=0, seed=args.seed)
    t0 = time.perf_counter()
    trainer = MultiBitTrainer(model, train, test.subset(1000, seed=args.seed), config, quiet=True)
    trainer.fit()
    model = trainer.models["all"].eval()
    anybit.save(model, tmp / "ckpt" / "model")
    return model, {"checkpoint": None, "train_s": time.perf_counter() - t0, "epochs": args.epochs,
                   "checkpoint_bytes": file_size(tmp / "ckpt")}


def integer_grids(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose quantized layers use per-channel symmetric weights without weight bias
    correction (integer zero points: what ONNX Runtime's integer kernels take); everything else as trained."""
    twin = copy.deepcopy(model)
    for layer in quant_layers(twin).values():
        if layer.pinned is None:
            layer.weight_quant = WeightQuantizer("symmetric", per_channel=True)
            layer.wbc = False
    return twin


def onnx_against_pytorch(model, path: Path, test_loader, labels, threads: int) -> dict:
    session = anybit.export.onnx_session(path, threads=threads)
    logits_pt, logits_ort = [], []
    with torch.no_grad():
        for images, _ in test_loader:
            logits_pt.append(model(images))
            logits_ort.append(session(images))
    pt, ort_ = torch.cat(logits_pt), torch.cat(logits_ort)
    per_image = (pt - ort_).abs().amax(1)
    return {"pytorch_top1": 100.0 * (pt.argmax(1) == labels).float().mean().item(),
            "onnx_top1": 100.0 * (ort_.argmax(1) == labels).float().mean().item(),
            "agreement": 100.0 * (pt.argmax(1) == ort_.argmax(1)).float().mean().item(),
            "max_logit_diff": per_image.max().item(), "median_logit_diff": per_image.median().item(),
            "logit_range": pt.abs().max().item()}


def kernels(summary: dict) -> dict:
    counts = collections.Counter(v["kernel"] for v in summary["layers"].values())
    return {"integer_layers": counts.get("integer", 0), "float_layers": counts.get("float", 0),
            "shifted_layers": sum(bool(v.get("weight_shift")) for v in summary["layers"].values()),
            "requantized_outputs": summary["requantized"]}


def agreement(args, tmp: Path) -> dict:
    train = anybit.data.load("fashion-mnist", "train", data_dir=args.data_dir)
    calib = anybit.data.load("fashion-mnist", "train", data_dir=args.data_dir, augment=False)
    test = anybit.data.load("fashion-mnist", "test", data_dir=args.data_dir)
    if args.train_subset:
        train, calib = train.subset(args.train_subset, seed=args.seed), calib.subset(args.train_subset, seed=args.seed)
    model, out = trained_model(args, train, test, tmp)
    meta = model.anybit_meta
    float_bytes = float_checkpoint_bytes(anybit.models.create(meta["arch"], **meta.get("arch_kwargs", {})), tmp,
                                         "fm-float")
    out.update({"arch": meta["arch"], "arch_kwargs": meta.get("arch_kwargs", {}), "test_images": len(test),
                "float_checkpoint_bytes": float_bytes, "emqnet": {}, "integer": {}, "packed": {}})
    calib_loader = anybit.data.make_loader(calib.subset(args.calib, seed=args.seed), 128, shuffle=False)
    test_loader = anybit.data.make_loader(test, 256, shuffle=False)
    labels = torch.as_tensor(test.targets)
    example = next(iter(calib_loader))[0][:8]
    for bits in AGREEMENT_BITS:
        anybit.set_precision(model, bits)
        path = tmp / f"fm-onnx{bits}"
        summary = anybit.export(model, path, bits=bits, format="onnx", example_input=example, calib_data=calib_loader)
        row = onnx_against_pytorch(model, path, test_loader, labels, args.threads)
        rebuilt = anybit.export.with_onnx_weights(model)
        row["onnx_weights_top1"] = evaluate(rebuilt, test_loader, quiet=True)["accuracy"]
        row.update(kernels(summary), onnx_bytes=file_size(path))
        out["emqnet"][str(bits)] = row
        packed = anybit.export(model, tmp / f"fm-packed{bits}", bits=bits, example_input=example)
        out["packed"][str(bits)] = packed_sizes(packed, float_bytes)
    integer = integer_grids(model)
    for bits in INTEGER_BITS:
        anybit.set_precision(integer, bits)
        for requantize in (True, False):
            path = tmp / f"fm-int{bits}-{requantize}"
            summary = anybit.export(integer, path, bits=bits, format="onnx", example_input=example,
                                    calib_data=calib_loader, requantize=requantize)
            row = onnx_against_pytorch(integer, path, test_loader, labels, args.threads)
            row.update(kernels(summary), onnx_bytes=file_size(path))
            out["integer"][f"{bits}{'' if requantize else '-exact'}"] = row
    anybit.set_precision(model, 8)
    for name, bits in (("package_1_8", list(range(1, 9))), ("package_1_8_32", list(range(1, 9)) + [32])):
        s = anybit.export(model, tmp / name, bits=bits, example_input=example)
        out[name] = {"bytes": s["file_bytes"], "weight_bytes": s["weight_bytes"]}
    out["one_packed_file_per_precision_bytes"] = sum(
        anybit.export(model, tmp / f"single{b}", bits=b, example_input=example)["file_bytes"]
        for b in list(range(1, 9)) + [32])
    return out


# ------------------------------------------------------------------------------------------ latency
RUNTIMES = ("float_pytorch", "float_ort", "int8_ort", "int4_ort", "wbc8_ort")
NO_SPINNING = {"session.intra_op.allow_spinning": "0"}


def _models():
    torch.manual_seed(0)
    yield "resnet20", anybit.models.create("resnet20", width=1.0, num_classes=10)
    yield "resnet18", torchvision.models.resnet18(num_classes=10)


def varied_batchnorms(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose BatchNorms hold random statistics and affine terms, as trained ones differ
    from channel to channel (an untrained network's are constant and compress to nothing)."""
    twin = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    for m in twin.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -1.0, 1.0), (m.running_var, 0.5, 2.0), (m.weight.data, 0.5, 1.5),
                              (m.bias.data, -0.5, 0.5)):
                t.copy_(torch.rand(t.shape, generator=generator) * (hi - lo) + lo)
    return twin


def ort_profile(path: Path, x: torch.Tensor, runs: int = 5) -> dict:
    """Milliseconds per run by ONNX Runtime operator (its own session profiling, 1 thread), and the
    operators of the optimized graph."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.profile_file_prefix = str(path / "profile")
    options.optimized_model_filepath = str(path / "optimized.onnx")
    session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    ms = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            ms[e["args"]["op_name"]] += e["dur"] / 1000 / runs
    by_stage = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["args"]["op_name"] == "QLinearConv":
            by_stage[e["name"].split("_")[0]] += e["dur"] / 1000 / runs
    graph_ops = collections.Counter(n.op_type for n in onnx.load(str(path / "optimized.onnx")).graph.node)
    return {"ms": dict(ms.most_common()), "qlinearconv_ms_by_stage": dict(sorted(by_stage.items())),
            "optimized_graph_ops": dict(graph_ops.most_common())}


def latency(args, tmp: Path) -> dict:
    threads = [int(t) for t in str(args.latency_threads).split(",")]
    results = {}
    for name, float_model in _models():
        float_model.eval()
        images = torch.rand(256, 3, 32, 32)
        files = {"float_pytorch": float_checkpoint_bytes(float_model, tmp, f"{name}-float")}
        model = anybit.convert(copy.deepcopy(float_model), weight="symmetric", act="fixed").eval()
        anybit.calibrate_activations(model, images)
        wbc = anybit.convert(copy.deepcopy(float_model), wbc=True, act="fixed").eval()   # emqnet's weights
        anybit.calibrate_activations(wbc, images)
        paths = {}
        for label, source, bits, int4 in (("float_ort", model, 32, False), ("int8_ort", model, 8, False),
                                          ("int4_ort", model, 4, True), ("wbc8_ort", wbc, 8, False)):
            paths[label] = tmp / f"{name}-{label}"
            anybit.export(source, paths[label], bits=bits, format="onnx", example_input=images[:2],
                          calib_data=images, int4=int4)
            files[label] = file_size(paths[label])
        packed = {}
        for bits in (8, 4):
            s = anybit.export(model, tmp / f"{name}-packed{bits}", bits=bits, example_input=images[:2])
            packed[str(bits)] = packed_sizes(s, files["float_pytorch"])
        # untrained BatchNorms hold constant terms, which compress: the same file with terms that do not
        packed["4_varied_bn"] = packed_sizes(anybit.export(varied_batchnorms(model), tmp / f"{name}-packed4v", bits=4,
                                                           example_input=images[:2]), files["float_pytorch"])
        sessions = {(k, t): anybit.export.onnx_session(p, threads=t, config=NO_SPINNING)
                    for k, p in paths.items() for t in threads}
        row = {"files": files, "packed": packed, "ms": {}}
        for batch, calls in ((1, 20), (64, 1)):
            x = torch.rand(batch, 3, 32, 32)
            xn = x.numpy()
            runners = {}
            for t in threads:
                def pytorch(t=t):
                    torch.set_num_threads(t)
                    float_model(x)
                runners[("float_pytorch", t)] = pytorch
                runners.update({(k, t): (lambda s=sessions[(k, t)]: s.run(xn)) for k in paths})
            rounds = {k: [] for k in runners}
            with torch.no_grad():
                for fn in runners.values():   # warm-up
                    fn()
                    fn()
                for _ in range(args.repeats):   # interleaved: every configuration sees the same machine load
                    for k, fn in runners.items():
                        start = time.perf_counter()
                        for _ in range(calls):
                            fn()
                        rounds[k].append((time.perf_counter() - start) / calls * 1000)
            torch.set_num_threads(args.threads)
            row["ms"][str(batch)] = {str(t): {k: statistics.median(rounds[(k, t)]) for k in RUNTIMES}
                                     for t in threads}
        if name == "resnet20":
            row["profile_int8_batch64"] = ort_profile(paths["int8_ort"], torch.rand(64, 3, 32, 32))
        results[name] = row
    return results


# ------------------------------------------------------------------------------------------ report
def targets(report: dict) -> list[str]:
    """One line per target of the issue, met or not, from the measured numbers."""
    lines = []
    lat = report.get("latency")
    if lat:
        speed = []
        for name, row in lat.items():
            for t, ms in row["ms"]["64"].items():
                speed.append((name, t, ms["float_pytorch"] / ms["int8_ort"], ms["float_ort"] / ms["int8_ort"]))
        met = all(s >= TARGETS["speedup"] for _, _, s, _ in speed)
        lines.append(f"- int8 ONNX Runtime ≥ {TARGETS['speedup']:g}× faster than float PyTorch at batch 64: "
                     f"**{'met' if met else 'not met'}** — "
                     + ", ".join(f"{s:.2f}× ({n}, {t} thread{'s' if t != '1' else ''})" for n, t, s, _ in speed)
                     + ". Faster than float ONNX Runtime: **"
                     + ("met" if all(f > 1 for *_, f in speed) else "not met") + "** — "
                     + ", ".join(f"{f:.2f}×" for *_, f in speed) + ".")
        sizes = [(label, row["packed"][key]["vs_float"]) for name, row in lat.items()
                 for key, label in (("4", name), ("4_varied_bn", f"{name} with varied BatchNorm terms"))]
        agree = report.get("agreement")
        if agree:
            sizes.append((f"{agree['arch']} width {agree['arch_kwargs'].get('width', 1)}, trained",
                          agree["packed"]["4"]["vs_float"]))
        lines.append(f"- 4-bit packed ≤ {TARGETS['packed4']:.0%} of float: "
                     + ", ".join(f"{'met' if v <= TARGETS['packed4'] else 'not met'} for {n} ({100 * v:.1f} %)"
                                 for n, v in sizes) + ".")
    agree = report.get("agreement")
    if agree:
        pkg = agree["package_1_8"]["bytes"], agree["package_1_8_32"]["bytes"], agree["checkpoint_bytes"]
        met = "met" if max(pkg[:2]) < pkg[2] else "not met"
        lines.append(f"- Every-precision package smaller than the checkpoint: **{met}** ({100 * pkg[0] / pkg[2]:.0f} % "
                     f"for 1..8 bits, {100 * pkg[1] / pkg[2]:.0f} % with 32).")
        rows = agree["emqnet"]
        lines.append(f"- ONNX Runtime top-1 agreement ≥ {TARGETS['agreement']:g} % (emqnet, weight bias correction "
                     f"folded exactly): " + ", ".join(
                         f"{'met' if r['agreement'] >= TARGETS['agreement'] else 'not met'} at {b} bits "
                         f"({r['agreement']:.2f} %)" for b, r in rows.items())
                     + ". On integer kernels (symmetric grids, requantized residual branches): " + ", ".join(
                         f"{'met' if r['agreement'] >= TARGETS['agreement'] else 'not met'} at {b} bits "
                         f"({r['agreement']:.2f} %)" for b, r in agree["integer"].items() if "exact" not in b) + ".")
        changes = [r["onnx_weights_top1"] - r["pytorch_top1"] for r in rows.values()]
        lines.append("- Weight bias correction in ONNX: folded exactly (integer codes, per-channel scale and shift); "
                     "the PyTorch model with the ONNX file's weights changes top-1 by "
                     + ", ".join(f"{c:+.2f}" for c in changes) + " points at " + "/".join(rows) + " bits.")
    return lines


def markdown(report: dict) -> list[str]:
    lines = ["# Deployment: exported sizes, CPU latency, ONNX Runtime agreement", "",
             f"`{report['command']}` — {report['environment']['platform']}, {report['environment']['cpu_count']} "
             f"CPU cores shared with other work; every configuration timed interleaved in one process (median of "
             f"{report['repeats']} rounds; thread pools that do not spin between calls), so every ratio below "
             f"comes from one run.", ""]
    lat = report.get("latency")
    if lat:
        lines += ["## Latency and file size (3×32×32, per-channel symmetric weights, activations calibrated)", "",
                  "`wbc8 ort`: the same network with emqnet's weights (DoReFa with weight bias correction) at 8 "
                  "bits, exported exactly: its per-channel shift leaves no integer kernel to run it on.", ""]
        rows = []
        for name, row in lat.items():
            ms, files = row["ms"], row["files"]
            for t in ms["64"]:
                for k in RUNTIMES:
                    rows.append([name, k.replace("_", " "), t, fmt(ms["1"][t][k]), fmt(ms["64"][t][k]),
                                 fmt(ms["64"][t]["float_pytorch"] / ms["64"][t][k]),
                                 fmt(ms["64"][t]["float_ort"] / ms["64"][t][k]), files[k],
                                 fmt(files[k] / files["float_pytorch"], ".3f")])
        lines += [markdown_table(["model", "runtime", "threads", "batch 1 ms", "batch 64 ms",
                                  "speed-up vs float PyTorch (64)", "vs float ORT (64)", "file bytes",
                                  "size vs float"], rows), ""]
        prof = lat["resnet20"].get("profile_int8_batch64")
        if prof:
            total = sum(prof["ms"].values())
            lines += [f"ONNX Runtime's profile of the int8 ResNet-20 at batch 64 (1 thread, its kernels' time "
                      f"{total:.1f} ms): " + ", ".join(f"{op} {100 * v / total:.0f} %" for op, v in prof["ms"].items()
                                                      if v / total >= 0.005)
                      + ". Optimized graph: "
                      + ", ".join(f"{op} ×{c}" for op, c in prof["optimized_graph_ops"].items())
                      + ". QLinearConv time by stage (each stage's 3×3 convolutions do the same number of "
                      "multiply-adds; the stem and layer1 have 16 channels, layer2 32, layer3 64): "
                      + ", ".join(f"{k} {v:.1f} ms" for k, v in prof["qlinearconv_ms_by_stage"].items()) + ".", ""]
        rows = []
        for name, row in lat.items():
            p8, p4, pv = row["packed"]["8"], row["packed"]["4"], row["packed"]["4_varied_bn"]
            rows.append([name, row["files"]["float_pytorch"], p8["bytes"], fmt(p8["vs_float"], ".3f"), p4["bytes"],
                         fmt(p4["vs_float"], ".3f"), p4["codes"], p4["other"],
                         fmt(100 * p4["codes"] / p4["bytes"], ".1f")])
            rows.append([f"{name}, varied BatchNorm terms", row["files"]["float_pytorch"], "", "", pv["bytes"],
                         fmt(pv["vs_float"], ".3f"), pv["codes"], pv["other"],
                         fmt(100 * pv["codes"] / pv["bytes"], ".1f")])
        agree = report.get("agreement")
        if agree:
            p8, p4 = agree["packed"]["8"], agree["packed"]["4"]
            rows.append([f"{agree['arch']} width {agree['arch_kwargs'].get('width', 1)} (trained, emqnet)",
                         agree["float_checkpoint_bytes"], p8["bytes"], fmt(p8["vs_float"], ".3f"), p4["bytes"],
                         fmt(p4["vs_float"], ".3f"), p4["codes"], p4["other"],
                         fmt(100 * p4["codes"] / p4["bytes"], ".1f")])
        lines += ["Packed files (`anybit export --format packed`), against the float model's checkpoint. The "
                  "latency models are untrained: their BatchNorms hold constant terms, which compress; the "
                  "`varied BatchNorm terms` rows give them random ones, as a trained network's differ from "
                  "channel to channel; the Fashion-MNIST model is trained:", "",
                  markdown_table(["model", "float checkpoint bytes", "8-bit bytes", "ratio", "4-bit bytes", "ratio",
                                  "4-bit codes bytes", "4-bit other bytes", "codes % of file"], rows), ""]
    agree = report.get("agreement")
    if agree:
        trained = (f"trained here: emqnet, {agree['epochs']} epochs ({agree['train_s']:.0f} s)" if agree["train_s"]
                   else f"trained run {agree['checkpoint']}")
        lines += [f"## ONNX Runtime against the fake-quantized PyTorch model (Fashion-MNIST, {agree['test_images']} "
                  f"test images)", "",
                  f"{agree['arch']} {agree['arch_kwargs']}, {trained}; DoReFa weights with weight bias correction, "
                  f"folded exactly (integer codes, per-channel scale and shift). `median` is the median over "
                  f"images of the largest logit difference: most images differ by float rounding only, a few by an "
                  f"activation that float rounding moved across a rounding boundary.", ""]
        rows = [[b, fmt(r["pytorch_top1"]), fmt(r["onnx_top1"]), fmt(r["agreement"]), fmt(r["max_logit_diff"], ".3g"),
                 fmt(r["median_logit_diff"], ".2g"), fmt(r["logit_range"], ".2f"), fmt(r["onnx_weights_top1"]),
                 fmt(r["onnx_weights_top1"] - r["pytorch_top1"], "+.2f"), r["float_layers"], r["onnx_bytes"]]
                for b, r in agree["emqnet"].items()]
        lines += [markdown_table(["bits", "PyTorch top-1", "ORT top-1", "agreement %", "max |logit diff|", "median",
                                  "max |logit|", "PyTorch with ONNX weights", "change", "float-kernel layers",
                                  "onnx bytes"], rows), ""]
        lines += ["The same trained network on the grids ONNX Runtime's integer kernels take: per-channel symmetric "
                  "weights without weight bias correction (not trained for them, so lower top-1; at 2 bits they "
                  "leave one class, so that row is left out), activation grids and BatchNorm statistics as trained. "
                  "`requantized`: the default export, whose residual branches are requantized to 8 bits so "
                  "that every convolution and add runs on integer kernels; `exact`: `requantize=False`, those "
                  "convolutions run in float.", ""]
        rows = [[b.split("-")[0], "exact" if "exact" in b else "requantized", fmt(r["pytorch_top1"]),
                 fmt(r["onnx_top1"]), fmt(r["agreement"]), fmt(r["max_logit_diff"], ".3g"),
                 fmt(r["median_logit_diff"], ".2g"), r["integer_layers"], r["requantized_outputs"]]
                for b, r in agree["integer"].items()]
        lines += [markdown_table(["bits", "export", "PyTorch top-1", "ORT top-1", "agreement %", "max |logit diff|",
                                  "median", "integer-kernel layers", "requantized outputs"], rows), ""]
        lines += [f"Every-precision package: 1..8 bits {agree['package_1_8']['bytes']} bytes, 1..8 + 32 bits "
                  f"{agree['package_1_8_32']['bytes']} bytes, against {agree['checkpoint_bytes']} bytes for the "
                  f"checkpoint and {agree['one_packed_file_per_precision_bytes']} bytes for one packed file per "
                  f"precision (1..8 and 32).", ""]
    lines += ["## Targets (this record)", ""] + targets(report)
    return lines


def main(argv=None) -> int:
    args = apply_preset(parse(argv), QUICK, FULL)
    torch.set_num_threads(args.threads)
    report = {"command": command_line(__file__, argv), "mode": args.mode, "threads": args.threads,
              "latency_threads": args.latency_threads, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_latency:
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
