"""Training losses: token cross-entropy, multi-token prediction, load balancing, router z-loss.

Every term is a sum over this micro-batch's tokens divided by a count over the *global* batch
(all shards, all gradient-accumulation micro-batches; see `Normalizers`), so the terms of M
micro-batches add up to the loss of one batch M times larger, and so do their gradients.

Load balancing (spec section 5.4), per MoE layer l with E experts:
    LBL_l = E * sum_i f_{l,i} * P_{l,i}
    f_{l,i} = count of top-k selections of expert i / valid tokens, over the global batch
    P_{l,i} = mean router probability of expert i (the only path of the gradient)
"global" averages LBL_l over layers (the main model's and the MTP module's); "hf_pooled" is
transformers' formula (f and P pooled over the main model's layers), for parity checks.
Both equal k under perfectly uniform routing, the scale `router_aux_loss_coef` is set for.

`lbl_scope` says over which tokens f and P are taken, so that the global batch can be measured
against the scopes peers use (the Qwen team's "global-batch vs micro-batch" comparison):
    global_running  f over the global batch as far as the step has seen it: micro-batch m
                 uses the counts of micro-batches 1..m (all data shards) over their tokens, as
                 Megatron's `global_aux_loss` accumulates them; the last micro-batch sees the
                 whole batch's f. One forward per micro-batch (the default)
    global       f over the whole global batch for every micro-batch (Qwen3-Next's
                 definition, exactly): with train.micro_batches > 1 a forward-only routing pass
                 over the micro-batches counts first (train/step.py), +20-25% FLOPs; both
                 global forms are the same with one micro-batch
    micro_batch  f and P over each gradient-accumulation micro-batch (all its data shards
                 together), the loss averaged over the micro-batches that hold a valid token
                 (GShard / Switch as transformers and Megatron's `aux_loss` compute it per
                 forward pass; with one device per forward pass, as there, it is theirs; with
                 train.micro_batches=1 it equals the global scope)
    sequence     f and P over each row, the loss averaged over the rows that hold a valid
                 token (DeepSeek-V2/V3's sequence-wise loss; their f_i = E / (k T) * count_i
                 makes their sum k times smaller, so their alpha is k times our coefficient)
Each scope keeps E * sum_i f_i P_i with f summing to k, so one coefficient means the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qnext_jax.config import ConfigError, check_known_keys
from qnext_jax.data.batch import Batch
from qnext_jax.model.moe import RouterStats
from qnext_jax.ops.linear_cross_entropy import linear_cross_entropy
from qnext_jax.parallel.axes import head_sharding

LBL_FORMULAS = ("global", "hf_pooled")
LBL_SCOPES = ("global_running", "global", "micro_batch", "sequence")
# Scopes whose loss depends on how the batch is split into micro-batches.
SPLIT_DEPENDENT_SCOPES = ("global_running", "micro_batch")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    mtp_weight: float = 0.1  # lambda in L = CE + (lambda / D) * sum_k CE_k (Megatron's default)
    lbl_weight: float | None = None  # None: the model's router_aux_loss_coef
    lbl_formula: str = "global"
    lbl_scope: str = "global_running"  # the tokens f and P are taken over (LBL_SCOPES)
    z_loss_weight: float = 0.0  # router z-loss (ST-MoE); 0 disables it
    # The LM head fused with the cross-entropy over token chunks (ops/linear_cross_entropy):
    # the [B, T, V] logits are never held. False: the plain head and log-softmax.
    fused_head: bool = True
    head_chunk_tokens: int | None = None  # tokens per chunk per device; None: ~64 MiB of logits

    def __post_init__(self):
        if self.lbl_formula not in LBL_FORMULAS:
            raise ConfigError(f"loss.lbl_formula must be one of {LBL_FORMULAS}, got {self.lbl_formula!r}")
        if self.lbl_scope not in LBL_SCOPES:
            raise ConfigError(f"loss.lbl_scope must be one of {LBL_SCOPES}, got {self.lbl_scope!r}")
        if self.lbl_formula == "hf_pooled" and self.lbl_scope not in ("global", "global_running"):
            raise ConfigError(f"loss.lbl_formula=hf_pooled (transformers' parity formula) takes "
                              f"loss.lbl_scope=global or global_running, got {self.lbl_scope!r}")
        if self.head_chunk_tokens is not None and self.head_chunk_tokens < 1:
            raise ConfigError(f"loss.head_chunk_tokens must be positive or null, got "
                              f"{self.head_chunk_tokens}")
        for name in ("mtp_weight", "z_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LossConfig:
        check_known_keys(values, cls, "loss")
        return cls(**values)


class SeenCounts(NamedTuple):
    """What the micro-batches before this one routed (the global_running scope)."""

    expert_counts: jnp.ndarray  # [layers, E] top-k selections per expert
    tokens: jnp.ndarray  # [] valid tokens


class Normalizers(NamedTuple):
    """Counts over the whole global batch, known before any forward pass."""

    target_tokens: jnp.ndarray  # [] targets counted by the main loss
    mtp_target_tokens: jnp.ndarray  # [D] targets counted at each MTP depth
    router_tokens: jnp.ndarray  # [] non-padding tokens seen by each router
    router_rows: jnp.ndarray  # [] rows holding at least one such token (sequence scope)
    micro_batches: jnp.ndarray  # [] micro-batches holding at least one such token


def normalizers(batch: Batch, mtp_depth: int, micro_batches: int = 1) -> Normalizers:
    """The counts of `batch`, to be split into `micro_batches` as the step splits it (row r
    into micro-batch r mod M)."""
    mtp = [jnp.sum(mtp_targets(batch, k)[1]) for k in range(1, mtp_depth + 1)]
    valid = batch.valid.astype(jnp.float32)
    rows = valid.shape[0]
    by_micro_batch = valid.reshape(rows // micro_batches, micro_batches, -1).sum((0, 2))
    return Normalizers(
        jnp.maximum(jnp.sum(batch.loss_mask), 1.0),
        jnp.maximum(jnp.stack(mtp), 1.0) if mtp else jnp.zeros((0,)),
        jnp.maximum(jnp.sum(valid), 1.0),
        jnp.maximum(jnp.sum(jnp.any(valid > 0, axis=1)), 1.0),
        jnp.maximum(jnp.sum(by_micro_batch > 0), 1.0).astype(jnp.float32),
    )


def token_cross_entropy(logits, targets):
    """[B, T, V] fp32 logits, [B, T] targets -> [B, T] -log p(target), in fp32."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def mtp_targets(batch: Batch, depth: int):
    """Targets and mask for MTP depth k: position i predicts the token k+1 ahead, targets[i+k].

    The mask is the product of the main mask over i..i+k: the prediction counts only if every
    step from token i to the target stays inside one document (and the last k rows, which have
    no target, are masked).
    """
    length = batch.targets.shape[1]
    shift = min(depth, length)
    targets = jnp.pad(batch.targets[:, shift:], [(0, 0), (0, shift)])
    mask = batch.loss_mask
    for step in range(1, shift + 1):
        mask = mask * jnp.pad(batch.loss_mask[:, step:], [(0, 0), (0, step)])
    return targets, mask


def expert_fractions(stats: RouterStats, router_tokens) -> jnp.ndarray:
    """f [layers, E]: selections per valid token (sums to k over experts), without gradient."""
    return jax.lax.stop_gradient(stats.expert_counts / router_tokens)


def running_fractions(stats: RouterStats, seen: SeenCounts) -> jnp.ndarray:
    """f [layers, E] of the global_running scope: the selections of the micro-batches seen so
    far and this one, per valid token of theirs."""
    counts = seen.expert_counts[: stats.expert_counts.shape[0]] + stats.expert_counts
    tokens = jnp.maximum(seen.tokens + stats.num_tokens[0], 1.0)
    return expert_fractions(stats._replace(expert_counts=counts), tokens)


def load_balancing_loss(stats: RouterStats, fractions, router_tokens, formula: str = "global"):
    """LBL from this micro-batch's probability sums and global-batch fractions f [layers, E]."""
    num_experts = stats.prob_sums.shape[-1]
    probs = stats.prob_sums / router_tokens  # this micro-batch's share of the global mean
    if formula == "hf_pooled":
        return num_experts * jnp.sum(fractions.mean(0) * probs.mean(0))
    return num_experts * jnp.mean(jnp.sum(fractions * probs, axis=-1))


def scoped_load_balancing_loss(stats: RouterStats, fractions, norms: Normalizers, scope: str):
    """This micro-batch's share of the LBL of `scope` (module docstring), averaged over layers;
    `fractions` [layers, E] are the global-batch f (used by the global scope only)."""
    num_experts = stats.prob_sums.shape[-1]
    if scope in ("global", "global_running"):
        return load_balancing_loss(stats, fractions, norms.router_tokens)
    if scope == "micro_batch":
        tokens = jnp.maximum(stats.num_tokens, 1.0)[:, None]  # [layers, 1] this micro-batch's
        own = expert_fractions(stats, tokens)
        per_layer = num_experts * jnp.sum(own * stats.prob_sums / tokens, axis=-1)
        return jnp.mean(per_layer) / norms.micro_batches
    tokens = jnp.maximum(stats.row_tokens, 1.0)[..., None]  # [layers, B, 1]
    own = jax.lax.stop_gradient(stats.row_expert_counts / tokens)
    per_row = num_experts * jnp.sum(own * stats.row_prob_sums / tokens, axis=-1)  # [layers, B]
    counted = (stats.row_tokens > 0).astype(per_row.dtype)
    return jnp.mean(jnp.sum(per_row * counted, axis=-1)) / norms.router_rows


def hf_pooled_load_balancing_loss(stats: RouterStats):
    """transformers' `load_balancing_loss_func` from one batch's statistics (parity checks)."""
    tokens = stats.num_tokens[0]
    return load_balancing_loss(stats, expert_fractions(stats, tokens), tokens, "hf_pooled")


def all_router_stats(output) -> RouterStats | None:
    """The main model's and the MTP module's router statistics, one row per MoE layer."""
    parts = [s for s in (output.router_stats, output.mtp_router_stats) if s is not None]
    if not parts:
        return None
    return RouterStats(*(jnp.concatenate(p) for p in zip(*parts)))


def prediction_loss_sums(output, batch: Batch, config: LossConfig, head=None):
    """(main cross-entropy summed over its counted targets [], MTP cross-entropy summed per
    depth [D]); each divided by its target count gives the mean (see `mtp_targets`). An
    `output` without logits (the model called with logits=False) needs `head`, the model's
    `head_weight()`."""
    def cross_entropy(logits, hidden, targets):
        if logits is not None:
            return token_cross_entropy(logits, targets)
        if head is None:
            raise ValueError("the model output has no logits: pass head=model.head_weight()")
        weight, vocab_major = head
        return linear_cross_entropy(hidden, weight, targets, vocab_major=vocab_major,
                                    chunk_tokens=config.head_chunk_tokens,
                                    sharding=head_sharding())

    ce = jnp.sum(cross_entropy(output.logits, output.hidden, batch.targets) * batch.loss_mask)
    depths = max(len(output.mtp_logits), len(output.mtp_hidden))
    mtp = []
    for k in range(1, depths + 1):
        targets, mask = mtp_targets(batch, k)
        logits = output.mtp_logits[k - 1] if output.mtp_logits else None
        hidden = output.mtp_hidden[k - 1] if output.mtp_hidden else None
        mtp.append(jnp.sum(cross_entropy(logits, hidden, targets) * mask))
    return ce, jnp.stack(mtp) if mtp else jnp.zeros((0,), jnp.float32)


def loss_terms(output, batch: Batch, norms: Normalizers, config: LossConfig, lbl_coef: float,
               fractions=None, head=None, seen: SeenCounts | None = None
               ) -> dict[str, jnp.ndarray]:
    """This micro-batch's share of every loss term; they and their gradients add over
    micro-batches. `fractions` [layers, E]: global-batch f; None takes it from `output` (one
    micro-batch: the batch's own counts are the global counts), together with `seen`, the
    earlier micro-batches' counts, under the global_running scope. An `output` without logits
    (the model called with logits=False) needs `head`, the model's `head_weight()`."""
    ce, mtp = prediction_loss_sums(output, batch, config, head)
    terms = {"ce_loss": ce / norms.target_tokens}
    depths = mtp.shape[0]
    terms["mtp_loss"] = jnp.sum(mtp / norms.mtp_target_tokens[:depths]) / max(depths, 1)

    stats = all_router_stats(output)
    lbl = z_loss = jnp.zeros((), jnp.float32)
    if stats is not None:
        if config.lbl_formula == "hf_pooled" and output.router_stats is not None:
            stats = output.router_stats  # transformers knows no MTP module
        if fractions is None and seen is not None:
            fractions = running_fractions(stats, seen)
        elif fractions is None:
            fractions = expert_fractions(stats, norms.router_tokens)
        fractions = fractions[: stats.prob_sums.shape[0]]
        if config.lbl_formula == "hf_pooled":
            lbl = load_balancing_loss(stats, fractions, norms.router_tokens, "hf_pooled")
        else:
            lbl = scoped_load_balancing_loss(stats, fractions, norms, config.lbl_scope)
        z_loss = jnp.mean(stats.z_sums) / norms.router_tokens
    terms["lbl_loss"] = lbl
    terms["z_loss"] = z_loss
    terms["loss"] = (
        terms["ce_loss"] + config.mtp_weight * terms["mtp_loss"] + lbl_coef * lbl
        + config.z_loss_weight * z_loss
    )
    return terms
