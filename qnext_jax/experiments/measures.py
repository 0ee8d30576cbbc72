"""A finished run's numbers, from its metrics.jsonl (and the probe, for the output-gate study):
one value per measure for the study's table, and the curves its plots draw.

Expert load is the fraction of a layer's routed (token, choice) pairs each expert got, per
logged step (the trainer's `expert_load`); the router measures read the main model's and the
MTP module's MoE layers alike.
"""

from __future__ import annotations

import math

import numpy as np

DEAD_SHARE = 0.1  # an expert with less than a tenth of the uniform load counts as dead
EARLY_STEPS = 100  # the router-init study's window
COMPILING = 0.5  # a logged window under half the run's median rate held a compile

# Every value `summary` gives, as the tables title and format it; a study names its measures
# from these.
COLUMNS = {
    "eval_loss": ("eval loss (equal steps)", "{:.4f}"),
    "eval_loss_at_equal_time": ("eval loss (equal time)", "{:.4f}"),
    "train_seconds": ("train seconds", "{:.0f}"),
    "tokens_per_sec": ("tokens/s", "{:.0f}"),
    "load_entropy": ("load entropy / log E", "{:.3f}"),
    "dead_experts": (f"dead experts (< {DEAD_SHARE:.0%} of uniform load)", "{:.1%}"),
    "first_token_attention": ("attention on doc's first token", "{:.3f}"),
    "first_token_uniform": ("the same, attention spread evenly", "{:.3f}"),
    "max_activation": ("max abs h", "{:.1f}"),
    "max_over_median_activation": ("max / median abs h (worst layer)", "{:.0f}"),
    "norm_scale_max": ("max abs norm scale", "{:.3f}"),
    "norm_scale_growth": ("growth (end / first log)", "{:.3f}"),
    "early_imbalance": (f"mean MaxVio, steps <= {EARLY_STEPS}", "{:.3f}"),
    "first_step_imbalance": ("MaxVio at step 1", "{:.3f}"),
}


def curves(rows: list[dict], tokens_per_step: int) -> dict[str, list]:
    """Per logged step: training seconds so far (compile, evaluation and saving excluded: each
    window's steps at its measured rate), eval loss, norm scale, load imbalance, entropy."""
    # A window that compiled (the first step's, the first after a resume) is timed at the
    # run's median rate instead.
    rates = [row.get("tokens_per_sec", 0.0) for row in rows]
    typical = float(np.median(rates)) if rates else 0.0
    rates = [typical if rate < COMPILING * typical else rate for rate in rates]
    seconds, previous, out = 0.0, 0, {"eval_loss": [], "norm_scale_max": [], "imbalance": [],
                                      "load_entropy": [], "dead_experts": []}
    for row, rate in zip(rows, rates):
        seconds += (row["step"] - previous) * tokens_per_step / max(rate, 1e-9)
        previous = row["step"]
        if "eval_loss" in row:
            out["eval_loss"].append([row["step"], seconds, row["eval_loss"]])
        if "norm_scale_max" in row:
            out["norm_scale_max"].append([row["step"], row["norm_scale_max"]])
        load = np.asarray(row.get("expert_load", []), np.float64)
        if load.size:
            experts = load.shape[-1]
            out["imbalance"].append([row["step"], float(np.mean(load.max(-1) * experts - 1))])
            entropy = -np.sum(np.where(load > 0, load * np.log(np.maximum(load, 1e-30)), 0), -1)
            out["load_entropy"].append([row["step"], float(np.mean(entropy) / math.log(experts))])
            out["dead_experts"].append([row["step"], float(np.mean(load < DEAD_SHARE / experts))])
    return out


def summary(rows: list[dict], run_curves: dict[str, list], probe: dict | None) -> dict[str, float]:
    """The table's values for one run (each study shows the ones it names)."""
    values: dict[str, float] = {}
    evals = run_curves["eval_loss"]
    if evals:
        values["eval_loss"] = evals[-1][2]
        values["train_seconds"] = evals[-1][1]
    rates = [row["tokens_per_sec"] for row in rows[1:] if "tokens_per_sec" in row]
    if rates:
        values["tokens_per_sec"] = float(np.median(rates))
    late = _last_quarter(run_curves["load_entropy"])
    if late:
        values["load_entropy"] = float(np.mean(late))
        values["dead_experts"] = float(np.mean(_last_quarter(run_curves["dead_experts"])))
    early = [(step, value) for step, value in run_curves["imbalance"] if step <= EARLY_STEPS]
    if early:
        values["early_imbalance"] = float(np.mean([value for _, value in early]))
        if early[0][0] == 1:
            values["first_step_imbalance"] = early[0][1]
    scales = run_curves["norm_scale_max"]
    if scales:
        values["norm_scale_max"] = scales[-1][1]
        values["norm_scale_growth"] = scales[-1][1] / scales[0][1]
    if probe:
        values["first_token_attention"] = float(np.mean(probe["first_token_attention"]))
        if "first_token_uniform" in probe:
            values["first_token_uniform"] = probe["first_token_uniform"]
        values["max_activation"] = max(probe["max_activation"])
        values["max_over_median_activation"] = max(
            largest / max(median, 1e-30)
            for largest, median in zip(probe["max_activation"], probe["median_activation"]))
    return values


def value_at_time(eval_curve: list, seconds: float) -> float:
    """Eval loss at `seconds` of training, linear between the evaluations around it; NaN
    before the first evaluation or after the last (unknown there, not the nearest value)."""
    times = [t for _, t, _ in eval_curve]
    losses = [loss for _, _, loss in eval_curve]
    if not times or not times[0] <= seconds <= times[-1] * (1 + 1e-9):
        return float("nan")
    return float(np.interp(seconds, times, losses))


def _last_quarter(series: list) -> list[float]:
    values = [value for _, value in series]
    return values[len(values) - max(1, len(values) // 4):] if values else []
