"""Training-step time of ResNet-20 at 4 bits relative to float, measured in one process.

Float and quantized steps are interleaved (float, 4-bit, float, 4-bit, ...) so that noise from
other work on the machine hits both alike; the ratio of medians is reported.

    python benchmarks/quant_overhead.py --quick      # CPU, a few minutes
    python benchmarks/quant_overhead.py --device cuda --width 5 --steps 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import anybit
from anybit.models import create
from anybit.report import environment, format_table
from anybit.train import METHODS, TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 1.10


def step_time(model, optimizer, x, y, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(spec: anybit.QuantSpec, bits: int, args, device) -> dict:
    torch.manual_seed(0)
    model = anybit.convert(create("resnet20", width=args.width), spec).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    times = {32: [], bits: []}
    for i in range(args.warmup + args.steps):
        for b in (32, bits):
            anybit.set_precision(model, b)
            t = step_time(model, optimizer, x, y, device)
            if i >= args.warmup:
                times[b].append(t)
    float_s, quant_s = statistics.median(times[32]), statistics.median(times[bits])
    return {"float_step_s": float_s, "quant_step_s": quant_s, "ratio": quant_s / float_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU setting: 1x width, 20 measured steps")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.width = 20, 1.0
    device = torch.device(args.device)

    def method_spec(name: str) -> anybit.QuantSpec:   # exactly what the trainer converts with
        return METHODS[name].spec_for(TrainConfig(method=name, bits=(1, 2, 4, 8, 32)).resolved())

    configs = {
        "dedicated: DoReFa, fixed [0, 1] activations": method_spec("dedicated"),
        "anyprecision: the same, one BatchNorm per bit-width": method_spec("anyprecision"),
        "emqnet: DoReFa + weight bias correction, clipped float path, per-precision BatchNorm statistics":
            method_spec("emqnet"),
        "DoReFa, learned activation range, every layer quantized": anybit.QuantSpec(weight="dorefa",
                                                                                    keep_first_last=None),
        "symmetric per-channel, every layer quantized": anybit.QuantSpec(weight="symmetric", keep_first_last=None),
    }
    rows, results = [], {}
    for label, spec in configs.items():
        r = measure(spec, args.bits, args, device)
        results[label] = r
        rows.append([label, f"{r['float_step_s'] * 1000:.0f}", f"{r['quant_step_s'] * 1000:.0f}", f"{r['ratio']:.3f}"])
        print(f"{label}: {r['ratio']:.3f}x", file=sys.stderr)

    command = "python benchmarks/quant_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"command": command.strip(), "config": vars(args), "environment": environment(), "target_ratio": TARGET,
           "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quant_overhead.json").write_text(json.dumps(out, indent=2) + "\n")
    print(format_table(["quantizer", "float step ms", f"{args.bits}-bit step ms", "ratio"], rows, markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
