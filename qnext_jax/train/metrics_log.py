"""Where the logged metrics go (process 0 only): `metrics.jsonl`, TensorBoard event files
(tensorboardX) and, with `train.wandb_project`, Weights & Biases.

A resumed run first drops the rows that the interrupted run logged after its last checkpoint
(that work was lost and is done again); TensorBoard gets the same cut through a purge step
(a SessionLog START), which hides every older point at or after it.

A sink that fails (a full disk, a dropped W&B connection) is reported once and switched off:
losing a log line must never stop training or cost a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import sys
from pathlib import Path

from qnext_jax.config import ConfigError

SCALARS = ("loss", "ce_loss", "mtp_loss", "lbl_loss", "z_loss", "grad_norm", "lr",
           "norm_scale_max")
THROUGHPUT = ("tokens_per_sec", "model_tflops", "mfu")
METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"


def scalar_tags(row: dict) -> dict[str, float]:
    """The row's scalars under their TensorBoard / W&B names."""
    tags = {f"train/{k}": row[k] for k in (*SCALARS, *THROUGHPUT) if k in row}
    if "eval_loss" in row:
        tags["eval/ce_loss"] = row["eval_loss"]
    if "eval_mtp_loss" in row:
        tags["eval/mtp_loss"] = row["eval_mtp_loss"]
    for depth, rate in enumerate(row.get("eval_mtp_acceptance", ()), start=1):
        tags[f"eval/mtp_acceptance_depth{depth}"] = rate
    return {k: float(v) for k, v in tags.items() if v is not None and math.isfinite(float(v))}


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def check_wandb(project: str | None) -> None:
    """Fails before any compilation when W&B logging is asked for but not installed."""
    if project is None:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(f"train.wandb_project={project!r} needs the wandb package: "
                          "pip install -e '.[wandb]'") from None


class MetricsLog:
    def __init__(self, run_dir: Path, resumed_at: int, *, run_config: dict,
                 wandb_project: str | None = None, wandb_mode: str = "auto", log=print):
        self.log = log
        path = run_dir / METRICS_FILE
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.endswith("}") and json.loads(line)["step"] <= resumed_at]
            path.write_text("".join(line + "\n" for line in kept))
        self.jsonl = path.open("a")
        from tensorboardX import SummaryWriter

        # One new event file per start; TensorBoard reads them in name order, and two starts
        # in the same second would otherwise share a name (the second truncating the first).
        events = run_dir / "tensorboard"
        starts = len(list(events.glob("events.out.tfevents.*"))) if events.is_dir() else 0
        # Any earlier start logged steps after `resumed_at` that are lost (all of them when a
        # run died before its first checkpoint): TensorBoard hides them from the purge step on.
        self.events = SummaryWriter(str(events), filename_suffix=f".{starts:04d}",
                                    purge_step=resumed_at + 1 if starts else None)
        self.wandb = None
        if wandb_project is not None:
            self.wandb = _start_wandb(run_dir, wandb_project, wandb_mode, run_config,
                                      resumed_at, log)
        self._failed: set[str] = set()

    def write(self, row: dict) -> None:
        tags = scalar_tags(row)
        self._guard("metrics.jsonl", lambda: (self.jsonl.write(json.dumps(row) + "\n"),
                                              self.jsonl.flush()))
        self._guard("TensorBoard", lambda: self._tensorboard(row["step"], tags))
        if self.wandb is not None:
            self._guard("W&B", lambda: self.wandb.log(tags, step=row["step"]))

    def _tensorboard(self, step: int, tags: dict[str, float]) -> None:
        for tag, value in tags.items():
            self.events.add_scalar(tag, value, step)
        self.events.flush()

    def _guard(self, sink: str, write) -> None:
        if sink in self._failed:
            return
        try:
            write()
        except Exception as error:  # any sink's failure: report, switch it off, train on
            self._failed.add(sink)
            print(f"warning: writing metrics to {sink} failed ({type(error).__name__}: "
                  f"{error}); it is switched off for the rest of the run", file=sys.stderr)

    def close(self) -> None:
        self._guard("metrics.jsonl", self.jsonl.close)
        self._guard("TensorBoard", self.events.close)
        if self.wandb is not None:
            self._guard("W&B", self.wandb.finish)


def _start_wandb(run_dir: Path, project: str, mode: str, run_config: dict, resumed_at: int, log):
    """One W&B run per run: its id is kept in run_dir, so a resumed run continues it (a fresh
    start takes a new id). Online, a resume rewinds the W&B history to the checkpoint's step,
    as TensorBoard's purge does; offline runs cannot rewind (W&B then keeps the first value
    of a step logged twice). Mode `auto` goes online only when credentials exist and the
    server answers, else offline (upload later with `wandb sync run_dir/wandb/offline-run-*`)."""
    import wandb

    id_file = run_dir / WANDB_ID_FILE
    if not resumed_at or not id_file.exists():
        id_file.write_text(secrets.token_hex(4))
    run_id = id_file.read_text().strip()
    if mode == "auto":
        mode, reason = _wandb_auto_mode()
        log(f"W&B: {mode} ({reason})")
    common = dict(project=project, dir=str(run_dir), name=run_dir.name, mode=mode,
                  config=run_config)
    if resumed_at and mode == "online":
        try:
            return wandb.init(resume_from=f"{run_id}?_step={resumed_at}", **common)
        except Exception as error:  # rewinding is a server feature; continue without it
            log(f"W&B: cannot rewind run {run_id} to step {resumed_at} ({error}); resuming it")
    return wandb.init(id=run_id, resume="allow", **common)


def _wandb_auto_mode() -> tuple[str, str]:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE is set"
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))
    if not has_key:
        return "offline", "no API key (WANDB_API_KEY or `wandb login`)"
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=3).close()
    except OSError:
        return "offline", "api.wandb.ai cannot be reached"
    return "online", "api.wandb.ai answers"
