"""The Qwen3-Next causal LM: embedding, scanned decoder blocks, final norm, head, and MTP.

Layers are stacked in blocks of one pattern period (`config.block_size`; 4 for the 80B model)
and the block runs under `lax.scan`, so compile time does not grow with depth (unrolled on CPU,
see `ModelConfig.layer_scan`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from qnext_jax.config import ModelConfig
from qnext_jax.model.decoder_layer import DecoderBlock
from qnext_jax.model.moe import RouterStats
from qnext_jax.model.mtp import MultiTokenPredictor
from qnext_jax.model.norms import RMSNorm
from qnext_jax.model.params import cast, compute_dtype, normal_param
from qnext_jax.model.rope import rotary_tables
from qnext_jax.ops.platform import target_platform
from qnext_jax.ops.take_rows import take_rows
from qnext_jax.parallel.axes import constrain, constrain_spec, logical_spec

HIDDEN_AXES = ("batch", "sequence", "act_embed")


class ModelOutput(NamedTuple):
    logits: jnp.ndarray | None  # [B, T, V] fp32; None when called with logits=False
    hidden: jnp.ndarray  # [B, T, E] after the final norm (what the head reads)
    router_stats: RouterStats | None  # fields [num_moe_layers, E] in layer order
    mtp_logits: tuple[jnp.ndarray, ...]  # depth k = 1..D: [B, T, V] fp32, position i predicts i+k+1
    mtp_router_stats: RouterStats | None  # fields [D * mtp MoE layers, E]
    mtp_hidden: tuple[jnp.ndarray, ...] = ()  # depth k = 1..D: [B, T, E], what the head reads


class Qwen3NextModel(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = normal_param(rngs, (config.vocab_size, config.hidden_size), config, ("vocab", "embed"))  # VE
        block_keys = jax.random.split(rngs.params(), config.num_blocks)
        # Parameters of every block stacked on a leading `layers` axis of size num_blocks.
        self.blocks = nnx.vmap(lambda key: DecoderBlock(config, rngs=nnx.Rngs(params=key)))(block_keys)
        self.final_norm = RMSNorm(config.hidden_size, config)
        if not config.tie_word_embeddings:
            self.lm_head = normal_param(rngs, (config.hidden_size, config.vocab_size), config, ("embed", "vocab"))  # EV
        self.mtp = MultiTokenPredictor(config, rngs=rngs) if config.mtp_num_hidden_layers else None

    def embed_tokens(self, input_ids):
        """[B, T] ids -> [B, T, E] rows in the compute dtype; the table's gradient sums every
        token's row in fp32 (a frequent token's thousands of bf16 rows would round away)."""
        # FSDP: gather the table's width before the lookup (a lookup into a width-sharded table
        # would leave the rows width-sharded, and XLA can only re-shard that by replicating).
        # The backward adds the rows into the table's gradient where its width shard lives.
        return take_rows(self.embed[...], input_ids, compute_dtype(self.config),
                         constrain=lambda table: constrain(table, ("vocab", None)),
                         grad_layout=(lambda grad: constrain(grad, ("vocab", "embed")),
                                      width_sharded_rows))

    def head_weight(self):
        """(weight in the compute dtype, vocab_major): the tied embedding [V, E] or the LM
        head [E, V]; for losses that apply the head themselves (ops/linear_cross_entropy)."""
        dtype = compute_dtype(self.config)
        if self.config.tie_word_embeddings:
            return cast(self.embed, dtype), True
        return cast(self.lm_head, dtype), False

    def head(self, hidden):
        """Shared output head: [B, T, E] -> fp32 logits [B, T, V]."""
        weight, vocab_major = self.head_weight()
        spec = "BTE,VE->BTV" if vocab_major else "BTE,EV->BTV"
        return jnp.einsum(spec, hidden.astype(weight.dtype), weight,
                          preferred_element_type=jnp.float32)

    def __call__(self, input_ids, *, positions=None, segment_ids=None, valid=None, mtp=True,
                 logits=True):
        """input_ids [B, T] int. positions [B, T] (default 0..T-1), segment_ids [B, T] for
        packed rows, valid [B, T] marks tokens counted in the router statistics (not padding).
        `mtp=False` skips the MTP module (evaluation, generation); `logits=False` returns the
        head's inputs only (`hidden`, `mtp_hidden`), for a loss that never forms the logits."""
        config = self.config
        batch, length = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        rotary = rotary_tables(positions, config, compute_dtype(config))
        # Under a mesh, pin the residual stream to batch sharding (a no-op without one).
        h = constrain(self.embed_tokens(input_ids), HIDDEN_AXES)

        block_graph, block_state = nnx.split(self.blocks)

        def run_block(h, state):
            block = nnx.merge(block_graph, state)
            h, stats = block(h, rotary=rotary, segment_ids=segment_ids, valid=valid)
            return constrain(h, HIDDEN_AXES), stats

        h, stats = jax.lax.scan(run_block, h, block_state, unroll=unrolled_layers(config))
        hidden = self.final_norm(h)
        main_logits = self.head(hidden) if logits else None
        router_stats = None if stats is None else _flatten_layers(stats)

        mtp_hidden, mtp_stats = [], []
        if mtp and self.mtp is not None:
            previous = hidden
            for depth in range(1, config.mtp_depth + 1):
                # Token i+depth, padded past the end (those positions are masked in the loss).
                ahead_ids = jnp.pad(input_ids[:, depth:], [(0, 0), (0, min(depth, length))])
                previous, depth_stats = self.mtp(
                    previous, self.embed_tokens(ahead_ids),
                    rotary=rotary, segment_ids=segment_ids, valid=valid,
                )
                mtp_hidden.append(previous)
                if depth_stats is not None:
                    mtp_stats.append(depth_stats)
        mtp_router_stats = None
        if mtp_stats:
            mtp_router_stats = RouterStats(*(jnp.concatenate(p) for p in zip(*mtp_stats)))
        mtp_logits = tuple(self.head(h) for h in mtp_hidden) if logits else ()
        return ModelOutput(main_logits, hidden, router_stats, mtp_logits, mtp_router_stats,
                           tuple(mtp_hidden))


def width_sharded_rows(x):
    """[B, T, E] activations split on their width as the parameters are (the token axes that
    shard parameters gather the tokens instead); a no-op without a mesh."""
    width, rows = logical_spec(("embed", "batch"))  # `batch` keeps the axes `embed` leaves
    return constrain_spec(x, PartitionSpec(rows, None, width))


def unrolled_layers(config: ModelConfig) -> bool:
    if config.layer_scan == "auto":
        return target_platform() == "cpu"
    return config.layer_scan == "unroll"


def _flatten_layers(stats: RouterStats) -> RouterStats:
    """[blocks, MoE layers per block, ...] -> [blocks * per block, ...], i.e. layer order."""
    return RouterStats(*(x.reshape(-1, *x.shape[2:]) for x in stats))
