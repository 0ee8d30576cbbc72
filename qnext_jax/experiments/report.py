"""A study's table (markdown and JSON) and plots (PNG), from its runs' results.

The table has one row per variant: each measure's mean over the seeds, with the spread
(half the range) where there are several, so a difference smaller than the spread reads as
what it is: no difference at this scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from qnext_jax.experiments import measures

COLUMNS = measures.COLUMNS
SHOWN_WITH = {"eval_loss": ("train_seconds",), "first_token_attention": ("first_token_uniform",),
              "max_activation": ("max_over_median_activation",),
              "early_imbalance": ("first_step_imbalance",)}


def write_report(study, results: list[dict], out_dir: Path) -> list[Path]:
    _add_equal_time(results)
    columns = [c for m in study.measures for c in (m, *SHOWN_WITH.get(m, ()))]
    labels = list(dict.fromkeys(r["label"] for r in results))
    table = {label: {} for label in labels}
    lines = ["| variant | seeds | " + " | ".join(COLUMNS[c][0] for c in columns) + " |",
             "|---" * (len(columns) + 2) + "|"]
    for label in labels:
        runs = [r for r in results if r["label"] == label]
        cells = []
        for column in columns:
            values = [r["summary"][column] for r in runs if column in r["summary"]]
            if not values:
                cells.append("–")
                continue
            mean, spread = float(np.mean(values)), (max(values) - min(values)) / 2
            table[label][column] = {"mean": mean, "spread": spread, "values": values}
            text = COLUMNS[column][1].format(mean)
            cells.append(text + (" ± " + COLUMNS[column][1].format(spread) if len(values) > 1 else ""))
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    verdicts = separation(table, [c for c in columns if c in study.measures], study.pairs())
    markdown = out_dir / "results.md"
    markdown.write_text(f"**{study.name}**: {study.question}\n\n" + "\n".join(lines) + "\n\n"
                        + "\n".join(f"- {v['text']}" for v in verdicts) + "\n")
    summary = out_dir / "results.json"
    summary.write_text(json.dumps({"study": study.name, "table": table, "separation": verdicts},
                                  indent=1))
    return [markdown, summary, *_plots(study, results, table, out_dir)]


def separation(table: dict, columns: list[str], pairs) -> list[dict]:
    """Each (variant, baseline) pair, measure by measure: the difference of the means, and
    whether the seeds' ranges leave each other (separated) or overlap (inside seed noise at
    this scale). One seed per variant gives no noise estimate, and says so."""
    verdicts = []
    for column in columns:
        for label, baseline in pairs:
            base = table.get(baseline, {}).get(column)
            other = table.get(label, {}).get(column)
            if base is None or other is None:
                continue
            title, form = COLUMNS[column]
            difference = other["mean"] - base["mean"]
            if len(base["values"]) < 2 or len(other["values"]) < 2:
                verdict = "one seed: no noise estimate"
            elif min(other["values"]) > max(base["values"]) or max(other["values"]) < min(base["values"]):
                verdict = "separated: the seeds' ranges do not overlap"
            else:
                verdict = "inside seed noise: the seeds' ranges overlap"
            sign = "+" if difference >= 0 else "-"
            verdicts.append({"measure": column, "variant": label, "baseline": baseline,
                             "difference": difference, "verdict": verdict.split(":")[0],
                             "text": f"{title}: {label} - {baseline} = {sign}"
                                     f"{form.format(abs(difference))} ({verdict})"})
    return verdicts


def _add_equal_time(results: list[dict]) -> None:
    """Each run's eval loss at the training time of the fastest variant's end."""
    ends = [r["curves"]["eval_loss"][-1][1] for r in results if r["curves"]["eval_loss"]]
    if not ends:
        return
    for result in results:
        if result["curves"]["eval_loss"]:
            result["summary"]["eval_loss_at_equal_time"] = measures.value_at_time(
                result["curves"]["eval_loss"], min(ends))


def _plots(study, results: list[dict], table: dict, out_dir: Path) -> list[Path]:
    labels = list(dict.fromkeys(r["label"] for r in results))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    panels = [("eval loss", "step", lambda c: [(s, v) for s, _, v in c["eval_loss"]])]
    if "eval_loss_at_equal_time" in study.measures:
        panels.append(("eval loss", "training seconds", lambda c: [(t, v) for _, t, v in c["eval_loss"]]))
    if "load_entropy" in study.measures:
        panels.append(("load entropy / log E", "step", lambda c: c["load_entropy"]))
    if "norm_scale_max" in study.measures:
        panels.append(("max |norm scale|", "step", lambda c: c["norm_scale_max"]))
    if "early_imbalance" in study.measures:
        panels.append(("MaxVio (E * max load - 1)", "step",
                       lambda c: [(s, v) for s, v in c["imbalance"] if s <= measures.EARLY_STEPS]))
    if "max_activation" in study.measures:
        panels.append(("max |h| after layer", "layer (0: embedding)",
                       None))
    figure = Figure(figsize=(5 * (len(panels) + bool(study.grid)), 3.6), dpi=80)
    seeds = sorted({r["seed"] for r in results})
    for index, (title, x_label, series) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels) + bool(study.grid), index + 1)
        for result in results:
            first_seed = result["seed"] == seeds[0]
            if series is None:
                points = list(enumerate(result["probe"]["max_activation"]))
            else:
                points = series(result["curves"])
            if points:
                xs, ys = zip(*points)
                axes.plot(xs, ys, "-" if first_seed else "--", color=colours[result["label"]],
                          label=result["label"] if first_seed else "_nolegend_", linewidth=1.2)
        axes.set_title(title)
        axes.set_xlabel(x_label)
        axes.grid(alpha=0.3)
        if series is None:  # per layer
            axes.set_yscale("log")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if study.grid:
        _grid_panel(figure.add_subplot(1, len(panels) + 1, len(panels) + 1), study, table)
    legend_title = f"solid: seed {seeds[0]}, dashed: seed {', '.join(map(str, seeds[1:]))}"
    figure.axes[0].legend(fontsize=7, title=legend_title if len(seeds) > 1 else None,
                          title_fontsize=7)
    figure.suptitle(f"{study.name}: {study.question}", fontsize=9)
    figure.tight_layout()
    path = out_dir / f"{study.name}.png"
    figure.savefig(path)
    return [path]


def _grid_panel(axes, study, table: dict) -> None:
    """The final eval loss of each variant against the study's grid axis, one line per group
    (lbl_scope: against the expert count, one line per scope), bars spanning the seeds."""
    groups = list(dict.fromkeys(group for group, _ in study.grid.values()))
    for index, group in enumerate(groups):
        points = sorted((x, table[label]["eval_loss"]) for label, (g, x) in study.grid.items()
                        if g == group and "eval_loss" in table.get(label, {}))
        if points:
            xs = [x for x, _ in points]
            axes.errorbar(xs, [cell["mean"] for _, cell in points],
                          yerr=[cell["spread"] for _, cell in points], marker="o", capsize=3,
                          label=group, color=f"C{index}")
    axes.set_xscale("log", base=2)
    axes.set_xticks(sorted({x for _, x in study.grid.values()}),
                    [str(x) for x in sorted({x for _, x in study.grid.values()})])
    axes.set_title("final eval loss")
    axes.set_xlabel(study.grid_axis)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
