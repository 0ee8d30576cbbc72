"""AdamW for Qwen3-Next: the weight-decay mask, learning-rate schedules, global-norm clipping.

Decay applies to every matrix, the embeddings and the zero-centred RMSNorm weights: those store
w with scale (1 + w), so decaying w pulls the scale toward 1 (Qwen3-Next's "weight-decayed
norm"). It does not apply to the DeltaNet's A_log and dt_bias (decay rates, not weights) or to
its gated-norm weight, which is a plain scale initialised to 1: decaying it would pull the
scale toward 0. `decay_norm_weights=False` (a study's control) leaves every RMSNorm weight
undecayed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from qnext_jax.config import ConfigError, check_known_keys
from qnext_jax.model.norms import is_rms_norm_weight
from qnext_jax.model.params import parameter_names

# Parameter paths (suffixes of the flat NNX path) that weight decay must not touch.
NO_DECAY_SUFFIXES = (("A_log",), ("dt_bias",), ("mixer", "norm", "weight"))
SCHEDULES = ("warmup_cosine", "warmup_stable_decay", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-4
    schedule: str = "warmup_cosine"
    warmup_steps: int = 100
    total_steps: int = 10_000
    final_lr_fraction: float = 0.1  # of the peak, at the end of the cosine or the decay
    decay_fraction: float = 0.2  # warmup_stable_decay: the last fraction of steps decays
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    decay_norm_weights: bool = True  # the RMSNorm weights (Qwen3-Next's weight-decayed norms)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optimizer.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ConfigError(
                f"optimizer.warmup_steps ({self.warmup_steps}) must be within "
                f"[0, total_steps={self.total_steps}]"
            )
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"optimizer.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if not isinstance(self.decay_norm_weights, bool):
            raise ConfigError(f"optimizer.decay_norm_weights must be true or false, got "
                              f"{self.decay_norm_weights!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OptimizerConfig:
        check_known_keys(values, cls, "optimizer")
        return cls(**values)


def default_warmup_steps(total_steps: int) -> int:
    """Warmup when a run config leaves it unset: a tenth of the schedule, at most the default."""
    return min(OptimizerConfig.warmup_steps, total_steps // 10)


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    peak, warmup, total = config.learning_rate, config.warmup_steps, config.total_steps
    final = peak * config.final_lr_fraction
    if config.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
        )
    if config.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=final)
    decay_steps = max(1, round(config.decay_fraction * total))
    stable_steps = max(0, total - warmup - decay_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak, warmup),
            optax.constant_schedule(peak),
            optax.linear_schedule(peak, final, decay_steps),
        ],
        [warmup, warmup + stable_steps],
    )


def weight_decay_mask(params, decay_norm_weights: bool = True) -> Any:
    """A pytree like `params` (an nnx.State or a nested dict) of bools: True = decay."""
    def decays(path, _):
        names = parameter_names(path)
        if not decay_norm_weights and is_rms_norm_weight(names):
            return False
        return not any(names[-len(suffix):] == suffix for suffix in NO_DECAY_SUFFIXES)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
        weight_decay=config.weight_decay,
        mask=lambda params: weight_decay_mask(params, config.decay_norm_weights),
    )
    if config.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
