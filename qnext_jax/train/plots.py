"""The two end-of-run pictures (matplotlib, PNG and SVG), drawn from `metrics.jsonl`:

- loss_curves: train CE and MTP loss, each raw (thin) and smoothed (a debiased exponential
  moving average, as TensorBoard draws it), and the held-out eval points;
- mtp_acceptance: beside the loss curves, the MTP drafts' teacher-forced acceptance rate per
  depth at each evaluation (what the MTP loss buys at decoding time);
- expert_load: per MoE layer and expert, the share of routed tokens relative to uniform
  (1 = its fair share), on a diverging colour scale centred at 1, with a colour bar.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from qnext_jax.train.metrics_log import read_metrics

TRAIN_SERIES = (("ce_loss", "train CE", "tab:blue"), ("mtp_loss", "train MTP", "tab:orange"))
EVAL_SERIES = (("eval_loss", "eval CE", "tab:green"), ("eval_mtp_loss", "eval MTP", "tab:red"))
FORMATS = ("png", "svg")


def smoothed(values, weight: float) -> np.ndarray:
    """Debiased EMA: s_t = (w s_{t-1} + (1 - w) x_t) / (1 - w^t), so the start is not
    pulled towards zero."""
    out, average = np.empty(len(values)), 0.0
    for t, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out[t - 1] = average / (1 - weight ** t)
    return out


def _points(rows: list[dict], key: str):
    pairs = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def loss_curves_figure(rows: list[dict], title: str, log_steps: bool = False) -> Figure:
    figure = Figure(figsize=(9, 5.2), layout="constrained")
    axes = figure.add_subplot()
    drawn = 0
    for key, label, colour in TRAIN_SERIES:
        steps, values = _points(rows, key)
        if not len(steps):
            continue
        # A time constant of a tenth of the points: smooth, yet following the trend.
        weight = max(0.0, 1 - 10 / len(values))
        axes.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8)
        axes.plot(steps, smoothed(values, weight), color=colour, linewidth=2,
                  label=f"{label} (last {values[-1]:.3f})")
        drawn += 1
    for key, label, colour in EVAL_SERIES:
        steps, values = _points(rows, key)
        if not len(steps):
            continue
        axes.plot(steps, values, color=colour, marker="o", linewidth=1.5,
                  label=f"{label} (last {values[-1]:.3f})")
        drawn += 1
    if not drawn:
        raise ValueError("no loss values to plot")
    if log_steps:
        axes.set_xscale("log")
    axes.set_xlabel("step" + (" (log scale)" if log_steps else ""))
    axes.set_ylabel("loss (nats / token)")
    axes.set_title(f"{title}  (thin: as logged, thick: smoothed)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper right")
    return figure


def acceptance_figure(rows: list[dict], title: str, log_steps: bool = False) -> Figure:
    """The eval rows' `eval_mtp_acceptance` (a rate per draft depth) against the step."""
    evals = [r for r in rows if r.get("eval_mtp_acceptance")]
    if not evals:
        raise ValueError("no eval_mtp_acceptance values to plot")
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    axes = figure.add_subplot()
    steps = np.array([r["step"] for r in evals])
    rates = np.array([r["eval_mtp_acceptance"] for r in evals], np.float64)  # [evals, depths]
    for depth in range(rates.shape[1]):
        axes.plot(steps, rates[:, depth], marker="o", linewidth=1.5,
                  label=f"depth {depth + 1} (last {rates[-1, depth]:.3f})")
    if log_steps:
        axes.set_xscale("log")
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("step" + (" (log scale)" if log_steps else ""))
    axes.set_ylabel("draft = main model's greedy token")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    return figure


def expert_load_figure(load, layer_names: list[str], title: str) -> Figure:
    """load: [layers, experts], the fraction of routed choices each expert received."""
    load = np.asarray(load, np.float64)
    layers, experts = load.shape
    ratio = load * experts
    figure = Figure(figsize=(max(6.0, min(16.0, 3 + 0.25 * experts)), max(3.0, 1.6 + 0.35 * layers)),
                    layout="constrained")
    axes = figure.add_subplot()
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(ratio.max())))
    image = axes.imshow(ratio, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    axes.set_yticks(range(layers), layer_names)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel(f"expert (0..{experts - 1})")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="routed tokens / uniform share")
    return figure


def write_run_plots(run_dir: Path, layer_names: list[str], log_steps: bool = False) -> list[Path]:
    """loss_curves, mtp_acceptance (with MTP and evaluation) and expert_load, each .png and
    .svg, from `run_dir/metrics.jsonl`."""
    rows = read_metrics(run_dir)
    written = []
    if rows:
        figure = loss_curves_figure(rows, f"loss ({run_dir.name})", log_steps)
        written += _save(figure, run_dir / "loss_curves")
    if any(r.get("eval_mtp_acceptance") for r in rows):
        figure = acceptance_figure(rows, f"MTP acceptance, teacher-forced ({run_dir.name})",
                                   log_steps)
        written += _save(figure, run_dir / "mtp_acceptance")
    loads = [r for r in rows if r.get("expert_load")]
    if loads:
        last = loads[-1]
        figure = expert_load_figure(last["expert_load"], layer_names,
                                    f"expert load at step {last['step']}")
        written += _save(figure, run_dir / "expert_load")
    return written


def _save(figure: Figure, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(f".{fmt}") for fmt in FORMATS]
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text
        for path in paths:
            figure.savefig(path, dpi=110)
    return paths
