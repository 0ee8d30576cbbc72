"""What a user watches during a run: a progress bar with step, loss, tokens/s, model FLOPs
utilisation and ETA.

Throughput is timed from the end of the first step this process runs, so compilation (tens of
seconds to minutes) never counts as training time; the first step's own rate is reported, but
it does not feed the ETA. MFU = achieved model FLOP/s over the devices' peak: the model's FLOPs
per token come from `ModelConfig.training_flops_per_token`, the peak from `train.peak_tflops` or,
when that is unset, from a table of dense bf16 peaks by device kind (CPUs have no entry: the bar
shows the achieved TFLOP/s instead).
"""

from __future__ import annotations

import sys

# Dense bf16 peak TFLOP/s per device (vendor data sheets; SXM parts for NVIDIA).
PEAK_TFLOPS = {
    "h100": 989.0, "h200": 989.0, "h800": 989.0, "b200": 2250.0, "gb200": 2500.0,
    "a100": 312.0, "a800": 312.0, "l40s": 362.0,
    "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v5": 459.0,
    "tpu v6 lite": 918.0, "tpu v6e": 918.0, "tpu7x": 2307.0,
}


def peak_tflops_per_device(device_kind: str) -> float | None:
    """The table entry whose name occurs in `device_kind` (longest match first), else None."""
    kind = device_kind.lower()
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if name in kind:
            return PEAK_TFLOPS[name]
    return None


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Throughput:
    """Tokens/s, model TFLOP/s, MFU and ETA from the step windows the loop reports."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, devices: int,
                 peak_tflops: float | None, total_steps: int):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.devices = devices
        self.peak_tflops = peak_tflops
        self.total_steps = total_steps
        self.steady_steps = 0  # steps after this process's first one, and the time they took
        self.steady_seconds = 0.0

    def window(self, steps: int, seconds: float, *, steady: bool = True) -> dict:
        """Metrics of `steps` steps that took `seconds` of training time; `steady` False for a
        window made of the compiling first step alone (kept out of the ETA)."""
        if steady:
            self.steady_steps += steps
            self.steady_seconds += seconds
        tokens_per_sec = steps * self.tokens_per_step / max(seconds, 1e-9)
        tflops = tokens_per_sec * self.flops_per_token / 1e12
        row = {"tokens_per_sec": tokens_per_sec, "model_tflops": tflops}
        if self.peak_tflops:
            row["mfu"] = tflops / (self.peak_tflops * self.devices)
        return row

    def eta_seconds(self, step: int) -> float | None:
        if not self.steady_steps:
            return None
        return (self.total_steps - step) * self.steady_seconds / self.steady_steps


class ProgressBar:
    """A tqdm bar redrawn in place on a terminal, with our fields after it; on anything else
    (a log file, CI, `nohup`, a cluster's output) one plain line per update, no carriage
    returns."""

    def __init__(self, total_steps: int, stream=None, initial: int = 0):
        self.total_steps = total_steps
        self.stream = stream if stream is not None else sys.stdout
        self.in_place = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        if self.in_place:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial, file=self.stream,
                             dynamic_ncols=True, bar_format="{n_fmt}/{total_fmt} |{bar:24}| {postfix}")

    @staticmethod
    def fields(row: dict, eta: float | None) -> str:
        text = (f"loss {row['loss']:.4f}  ce {row['ce_loss']:.4f}  mtp {row['mtp_loss']:.4f}  "
                f"lbl {row['lbl_loss']:.3f}  {row['tokens_per_sec']:,.0f} tok/s  ")
        if "mfu" in row:
            text += f"MFU {100 * row['mfu']:.1f}%  "
        else:
            text += f"{row['model_tflops'] * 1e3:.1f} GFLOP/s  "
        text += f"ETA {format_duration(eta) if eta is not None else '--'}"
        if "eval_loss" in row:
            text += f"  eval {row['eval_loss']:.4f}"
        if row.get("eval_mtp_acceptance"):
            rates = "/".join(f"{rate:.2f}" for rate in row["eval_mtp_acceptance"])
            text += f"  MTP accept {rates}"
        return text

    def line(self, row: dict, eta: float | None) -> str:
        return f"step {row['step']}/{self.total_steps}  {self.fields(row, eta)}"

    def update(self, row: dict, eta: float | None) -> None:
        if self._bar is None:
            self.stream.write(self.line(row, eta) + "\n")
            self.stream.flush()
            return
        self._bar.set_postfix_str(self.fields(row, eta), refresh=False)
        self._bar.update(row["step"] - self._bar.n)

    def message(self, text: str) -> None:
        """A line of its own; on a terminal the bar is redrawn below it."""
        if self._bar is None:
            self.stream.write(text + "\n")
            self.stream.flush()
        else:
            self._bar.write(text, file=self.stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
