"""Budget sweeps: a list of budgets, one allocation per budget, and the Pareto table and plot."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..report import format_table
from .cost import CostModel
from .errors import InfeasibleBudgetError, MixedPrecisionError
from .sensitivity import Sensitivity
from .solver import Allocation, allocate, allocate_greedy

PARETO_COLUMNS = ("method", "label", "budget", "relative_cost", "predicted_loss", "accuracy", "loss")


MAX_SWEEP = 200


def parse_sweep(text: str) -> list[float]:
    """Budgets from ``"START:STOP:STEP"`` (STOP included), e.g. ``"0.10:0.30:0.02"``, or ``"0.1,0.15,0.2"``.

    Every number must be finite and the number of budgets at most :data:`MAX_SWEEP`, checked before
    the list is built."""
    text = str(text).strip()
    sep = ":" if ":" in text else ","
    pieces = [p.strip() for p in text.split(sep)]
    try:
        parts = [float(p) for p in pieces]
    except ValueError:
        parts = []
    if not parts or (sep == ":" and len(parts) != 3):
        raise MixedPrecisionError(f"sweep {text!r} is not START:STOP:STEP (e.g. 0.10:0.30:0.02) or a comma list")
    if not all(math.isfinite(p) for p in parts):
        raise MixedPrecisionError(f"sweep {text!r}: every number must be finite (budgets are fractions in (0, 1])")
    if sep == ":":
        start, stop, step = parts
        if step <= 0 or stop < start:
            raise MixedPrecisionError(f"sweep {text!r}: need STEP > 0 and STOP >= START")
        count = math.floor((stop - start) / step + 1e-9) + 1
        if count > MAX_SWEEP:
            raise MixedPrecisionError(f"sweep {text!r} gives {count:,} budgets; use at most {MAX_SWEEP} "
                                      f"(a larger STEP)")
        values = [round(start + i * step, 10) for i in range(count)]
    else:
        values = parts
    if not values or any(not (v > 0) for v in values):
        raise MixedPrecisionError(f"sweep {text!r}: budgets must be positive fractions of the float model's cost")
    if len(values) > MAX_SWEEP:
        raise MixedPrecisionError(f"sweep {text!r} gives {len(values)} budgets; use at most {MAX_SWEEP}")
    return values


def sweep(sens: Sensitivity, cost: CostModel, budgets: Iterable[float], method: str = "ip"
          ) -> tuple[list[Allocation], list[tuple[float, str]]]:
    """One allocation per relative budget; infeasible budgets are returned separately with the reason."""
    solve = allocate if method == "ip" else allocate_greedy
    if method not in ("ip", "greedy"):
        raise MixedPrecisionError(f"method={method!r} is unknown: expected 'ip' or 'greedy'")
    done, skipped = [], []
    for b in budgets:
        try:
            done.append(solve(sens, cost, b))
        except InfeasibleBudgetError as e:
            skipped.append((b, str(e)))
    return done, skipped


def write_pareto(out_dir: str | os.PathLike, rows: Sequence[dict], metric: str, title: str = "",
                 float_accuracy: float | None = None, stem: str = "pareto") -> dict[str, Path]:
    """Write ``stem.csv``, ``stem.md`` and ``stem.png`` (accuracy vs relative cost, IP curve, greedy and
    uniform points). ``rows`` are dicts with the keys of :data:`PARETO_COLUMNS`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PARETO_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow(r)
    paths["md"].write_text(pareto_markdown(rows, metric) + "\n")
    plot_pareto(paths["png"], rows, metric, title, float_accuracy)
    return paths


def pareto_markdown(rows: Sequence[dict], metric: str) -> str:
    what = "size" if metric == "size" else "BOPs"
    table = [[r["method"], r["label"], _pct(r.get("budget")), _pct(r["relative_cost"]),
              _num(r.get("predicted_loss")), _num(r.get("accuracy"), 2), _num(r.get("loss"))] for r in rows]
    return format_table(["method", "allocation", "budget", f"relative {what}", "predicted ΔL", "top-1 %", "test loss"],
                        table, markdown=True)


def _pct(v) -> str:
    return "" if v is None else f"{100 * float(v):.2f}%"


def _num(v, digits: int = 4) -> str:
    return "" if v is None else f"{float(v):.{digits}f}"


def plot_pareto(path: str | os.PathLike, rows: Sequence[dict], metric: str, title: str = "",
                float_accuracy: float | None = None) -> Path:
    """Accuracy against relative size or BOPs, saved as a PNG (matplotlib's Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    draw_pareto(fig.add_subplot(), rows, metric, title, float_accuracy)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def draw_pareto(ax, rows: Sequence[dict], metric: str, title: str = "", float_accuracy: float | None = None) -> None:
    """Draw the IP curve, greedy points and labelled uniform points on a matplotlib ``ax``."""
    styles = {"ip": ("o-", "integer program"), "greedy": ("s--", "greedy")}
    for method, (fmt, label) in styles.items():
        pts = sorted((100 * r["relative_cost"], r["accuracy"]) for r in rows if r["method"] == method and r.get("accuracy") is not None)
        if pts:
            ax.plot(*zip(*pts), fmt, label=label, markersize=4)
    uni = [r for r in rows if r["method"] == "uniform" and r.get("accuracy") is not None]
    if uni:
        ax.scatter([100 * r["relative_cost"] for r in uni], [r["accuracy"] for r in uni], marker="*", s=90,
                   color="black", label="uniform", zorder=3)
        for r in uni:
            ax.annotate(r["label"], (100 * r["relative_cost"], r["accuracy"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=8)
    if float_accuracy is not None:
        ax.axhline(float_accuracy, color="grey", linestyle=":", label=f"float ({float_accuracy:.2f}%)")
    ax.set_xlabel(f"{'weight size' if metric == 'size' else 'BOPs'} (% of float)")
    ax.set_ylabel("top-1 accuracy (%)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
