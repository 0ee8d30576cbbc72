"""The two end-of-run pictures, as SVG files (no plotting library needed; any browser shows
them): the loss curves (train CE, MTP, eval) and a heatmap of the expert load per MoE layer."""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 150, 40, 50
SERIES = (("ce_loss", "train (CE)", "#1f77b4"), ("mtp_loss", "MTP", "#ff7f0e"),
          ("eval_loss", "eval (CE)", "#2ca02c"))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10)), key=lambda s: abs(s - raw))
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _text(x, y, text, anchor="middle", size=12, extra=""):
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-family="sans-serif"{extra}>{escape(str(text))}</text>')


def loss_curves_svg(rows: list[dict], title: str = "loss") -> str:
    series = []
    for key, label, colour in SERIES:
        points = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
        if points:
            series.append((label, colour, points))
    if not series:
        raise ValueError("no loss values to plot")
    steps = [s for _, _, pts in series for s, _ in pts]
    values = [v for _, _, pts in series for _, v in pts]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(values), max(values)
    pad = 0.05 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    sx = lambda s: LEFT + (s - x0) / (x1 - x0) * plot_w
    sy = lambda v: TOP + (y1 - v) / (y1 - y0) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}">',
             '<rect width="100%" height="100%" fill="white"/>',
             _text(WIDTH / 2, 24, title, size=15)]
    for tick in nice_ticks(y0, y1):
        y = sy(tick)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" '
                     'stroke="#ddd"/>')
        parts.append(_text(LEFT - 6, y + 4, f"{tick:g}", anchor="end", size=11))
    for tick in nice_ticks(x0, x1):
        x = sx(tick)
        parts.append(f'<line x1="{x:.1f}" y1="{TOP + plot_h}" x2="{x:.1f}" y2="{TOP + plot_h + 4}" '
                     'stroke="black"/>')
        parts.append(_text(x, TOP + plot_h + 18, f"{tick:g}", size=11))
    parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
                 'stroke="black"/>')
    parts.append(_text(LEFT + plot_w / 2, HEIGHT - 10, "step"))
    parts.append(_text(18, TOP + plot_h / 2, "loss (nats/token)",
                       extra=f' transform="rotate(-90 18 {TOP + plot_h / 2:.1f})"'))
    for i, (label, colour, points) in enumerate(series):
        path = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for s, v in points if len(points) < 60 else points[-1:]:
            parts.append(f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="2.5" fill="{colour}"/>')
        y = TOP + 14 + 20 * i
        parts.append(f'<line x1="{WIDTH - RIGHT + 12}" y1="{y}" x2="{WIDTH - RIGHT + 36}" y2="{y}" '
                     f'stroke="{colour}" stroke-width="3"/>')
        parts.append(_text(WIDTH - RIGHT + 42, y + 4, f"{label} {points[-1][1]:.3f}", anchor="start"))
    parts.append("</svg>")
    return "\n".join(parts)


def _load_colour(ratio: float) -> str:
    """White at the uniform load (ratio 1), blue below, red above; saturates at 0 and 3."""
    if ratio >= 1:
        t = min((ratio - 1) / 2, 1.0)
        r, g, b = 255, 255 * (1 - t), 255 * (1 - t)
    else:
        t = 1 - max(ratio, 0.0)
        r, g, b = 255 * (1 - t), 255 * (1 - 0.6 * t), 255
    return f"rgb({r:.0f},{g:.0f},{b:.0f})"


def expert_load_svg(load, layer_names: list[str], title: str) -> str:
    """load: [layers, experts], the fraction of routed choices each expert received."""
    load = np.asarray(load, np.float64)
    layers, experts = load.shape
    cell = max(6, min(28, (WIDTH - 160) // max(experts, 1)))
    width = 120 + experts * cell + 40
    height = 60 + layers * cell + 70
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
             '<rect width="100%" height="100%" fill="white"/>',
             _text(width / 2, 24, title, size=15)]
    for row in range(layers):
        y = 40 + row * cell
        parts.append(_text(112, y + cell / 2 + 4, layer_names[row], anchor="end", size=11))
        for e in range(experts):
            ratio = load[row, e] * experts
            parts.append(f'<rect x="{120 + e * cell}" y="{y}" width="{cell}" height="{cell}" '
                         f'fill="{_load_colour(ratio)}" stroke="#eee">'
                         f'<title>{escape(layer_names[row])}, expert {e}: {ratio:.2f} x uniform'
                         '</title></rect>')
    y = 40 + layers * cell + 18
    parts.append(_text(120 + experts * cell / 2, y, f"expert (0..{experts - 1})", size=11))
    for i, ratio in enumerate((0, 0.5, 1, 2, 3)):
        x = 120 + i * 80
        parts.append(f'<rect x="{x}" y="{y + 12}" width="18" height="12" '
                     f'fill="{_load_colour(ratio)}" stroke="#999"/>')
        parts.append(_text(x + 22, y + 22, f"{ratio:g} x uniform", anchor="start", size=10))
    parts.append("</svg>")
    return "\n".join(parts)


def write_run_plots(run_dir: Path, layer_names: list[str]) -> list[Path]:
    """loss_curves.svg and expert_load.svg from `run_dir/metrics.jsonl`."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    written = []
    if rows:
        path = run_dir / "loss_curves.svg"
        path.write_text(loss_curves_svg(rows, f"loss ({run_dir.name})"))
        written.append(path)
    loads = [r for r in rows if r.get("expert_load")]
    if loads:
        last = loads[-1]
        path = run_dir / "expert_load.svg"
        path.write_text(expert_load_svg(last["expert_load"], layer_names,
                                        f"expert load at step {last['step']} (share of routed tokens)"))
        written.append(path)
    return written
