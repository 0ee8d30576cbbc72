"""The run directory: one per run, shared by its processes, and the configuration it was
trained with, which a resumed run must not silently change.

Process 0 names a new directory and the others follow it (each process stamping its own time
would split one run over several folders). `config.json` holds the resolved run configuration;
a resume compares the new one with it key by key. Keys that only choose how the same steps are
computed or reported (the mesh, micro-batches, remat, logging and checkpoint cadence, the step
count itself) may change; any other difference (schedule, batch, sequence length, data,
model, loss) would change the trajectory and is an error naming the keys, unless
`train.accept_changes` lists them.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

import jax

from qnext_jax.config import ConfigError
from qnext_jax.parallel.distributed import broadcast_text
from qnext_jax.train.losses import SPLIT_DEPENDENT_SCOPES
from qnext_jax.train.optimizer import default_warmup_steps
from qnext_jax.train.run_config import all_keys

CONFIG_FILE = "config.json"

# Dotted keys (or whole sections, ending in ".") that a resumed run may change freely.
FREE_TO_CHANGE = (
    "mesh.",
    "train.steps", "train.micro_batches", "train.log_every", "train.eval_every",
    "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints", "train.run_dir",
    "train.export_hf", "train.export_dtype", "train.peak_tflops", "train.wandb_project",
    "train.wandb_mode", "train.accept_changes", "train.plot_log_steps", "train.check_memory",
    # Used only to create the initial state, which a resume restores instead.
    "train.seed", "train.init_from_hf",
    # The same function computed another way.
    "model.remat_policy", "model.layer_scan", "model.delta_rule_impl", "model.attention_impl",
    "model.context_parallel_attention", "model.moe_impl", "model.grouped_matmul", "loss.fused_head",
    "loss.head_chunk_tokens",
)
# ...unless experts drop tokens over capacity: which ones depends on the tokens per device and
# micro-batch and on the expert shards, and the dense MoE drops none.
CAPACITY_DEPENDS_ON = ("mesh.", "train.micro_batches", "model.moe_impl")
# ...and the micro-batch count unless the balancing loss is taken over the whole batch
# (the micro_batch scope balances each micro-batch, global_running the ones seen so far).
SPLIT_DEPENDS_ON = ("train.micro_batches",)
# Scopes that compute the same loss as another when the step has one micro-batch.
SAME_SCOPE_AT_ONE_MICRO_BATCH = {"global_running": "global"}
# Keys added since runs were first saved whose earlier behaviour is not their new default:
# a saved config without the key computed with this value.
BEFORE_THE_KEY_EXISTED = {"model.router_dtype": "compute"}

# Keys that follow another unless set: (the key they follow, the rule), to say why a key the
# user never wrote has changed.
DERIVED = {
    "optimizer.total_steps": ("train.steps", lambda steps: steps),
    "optimizer.warmup_steps": ("optimizer.total_steps", default_warmup_steps),
}


def new_run_dir(root: Path = Path("runs")) -> Path:
    """runs/<date-time>, named by process 0 for every process."""
    path = None
    if _is_main():
        root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, n = root / stamp, 1
        while True:  # created here, so two runs started in the same second never share it
            try:
                path.mkdir()
                break
            except FileExistsError:
                path, n = root / f"{stamp}-{n}", n + 1
    return Path(broadcast_text(None if path is None else str(path)))


def _is_main() -> bool:
    return jax.process_index() == 0


def flat_config(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, entries in config.items()
            for key, value in entries.items()}


def _matches(key: str, patterns) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def trajectory_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, current value)} for keys that change the trajectory. A key
    the saved config lacks (one added to the project since) counts only if its value is not
    the default, which is what the older run computed with."""
    old, new, defaults = flat_config(saved), flat_config(current), all_keys()
    dropping = any(c.get("model", {}).get("moe_capacity_factor") is not None
                   for c in (saved, current))
    old = {**{k: v for k, v in BEFORE_THE_KEY_EXISTED.items() if old}, **old}
    split_dependent = any(c.get("loss.lbl_scope", defaults["loss.lbl_scope"])
                          in SPLIT_DEPENDENT_SCOPES for c in (old, new))
    one_micro_batch = all(c.get("train.micro_batches", defaults["train.micro_batches"]) == 1
                          for c in (old, new))
    changes = {}
    for key in sorted(old.keys() | new.keys()):
        if (_matches(key, FREE_TO_CHANGE)
                and not (dropping and _matches(key, CAPACITY_DEPENDS_ON))
                and not (split_dependent and _matches(key, SPLIT_DEPENDS_ON))):
            continue
        if key not in old and new[key] == defaults.get(key):
            continue
        if _computes(key, old, one_micro_batch) != _computes(key, new, one_micro_batch):
            changes[key] = (old.get(key), new.get(key))
    return changes


def _computes(key: str, config: dict, one_micro_batch: bool):
    """What `key`'s value computes in `config`: values that compute the same there compare
    equal (the compute dtype's router in an fp32 model is the fp32 router; both global LBL
    forms are one loss when both runs have one micro-batch)."""
    value = config.get(key)
    if key == "model.router_dtype" and value == "compute":
        return "float32" if config.get("model.dtype") == "float32" else value
    if key == "loss.lbl_scope" and one_micro_batch:
        return SAME_SCOPE_AT_ONE_MICRO_BATCH.get(value, value)
    return value


def check_resume_config(run_dir: Path, current: dict, accepted: tuple[str, ...], log) -> None:
    """Raises ConfigError if resuming `run_dir` with `current` would change its trajectory in
    keys not listed in `accepted`; logs the accepted changes."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        log(f"{path} is missing: cannot check that the resumed run keeps its configuration")
        return
    changes = trajectory_changes(json.loads(path.read_text()), current)
    refused = {k: v for k, v in changes.items() if k not in accepted}
    if refused:
        lines = [f"  {key}: {old!r} -> {new!r}{_derivation(key, new, current)}"
                 for key, (old, new) in refused.items()]
        keep = " ".join(shlex.quote(f"{key}={json.dumps(old, separators=(',', ':'))}")
                        for key, (old, _) in refused.items())
        raise ConfigError(
            f"resuming {run_dir} with a configuration that changes its trajectory:\n"
            + "\n".join(lines)
            + f"\nto continue as it was trained, pass {keep}; to change it deliberately "
            f"(extending the schedule, say), pass train.accept_changes=[{','.join(refused)}]"
        )
    for key, (old, new) in changes.items():
        log(f"resuming with a changed {key}: {old!r} -> {new!r} (accepted)")


def _derivation(key: str, value, current: dict) -> str:
    if key not in DERIVED:
        return ""
    source, rule = DERIVED[key]
    followed = flat_config(current).get(source)
    return f" (follows {source} unless set)" if followed is not None and rule(followed) == value else ""


def write_config(run_dir: Path, config: dict) -> None:
    """Process 0 writes config.json (atomically: a resume reads it back)."""
    if not _is_main():
        return
    path = run_dir / CONFIG_FILE
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(config, indent=1))
    partial.replace(path)
