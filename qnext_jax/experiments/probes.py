"""What the output-gate study looks at inside a trained model: how much attention each query
pays to the first token of its document (an attention sink) and the largest activation of the
residual stream (a massive activation), on one evaluation batch.

The forward runs layer by layer, the softmax attention's probabilities formed explicitly
(short study rows only: [B, heads, T, T]); a test checks that its hidden state equals the
model's own forward, so the probe measures the model that was trained.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax.data.batch import Batch
from qnext_jax.model.params import compute_dtype
from qnext_jax.model.rope import rotary_tables
from qnext_jax.ops.segments import document_index


def first_token_attention(query, key, documents, valid, scale):
    """Mean attention probability on the first token of the query's document, over the heads
    and the valid queries that are not themselves a document's first token.
    query [B, T, N, D], key [B, T, K, D], documents / valid [B, T]."""
    batch, length, heads, _ = query.shape
    group = heads // key.shape[2]
    key = jnp.repeat(key, group, axis=2)  # query head n reads kv head n // group
    logits = jnp.einsum("BTND,BSND->BNTS", query.astype(jnp.float32), key.astype(jnp.float32))
    position = jnp.arange(length)
    same = documents[:, :, None] == documents[:, None, :]  # [B, T, S]
    allowed = same & (position[None, :, None] >= position[None, None, :])
    probs = jax.nn.softmax(jnp.where(allowed[:, None], logits * scale, -jnp.inf), axis=-1)
    # The first position of each token's document (documents are contiguous and increasing).
    first = jnp.argmax(same, axis=-1)  # [B, T]
    mass = jnp.take_along_axis(probs, first[:, None, :, None], axis=-1)[..., 0]  # [B, N, T]
    counted = (valid & (first != position[None])).astype(jnp.float32)[:, None]  # [B, 1, T]
    return jnp.sum(mass * counted) / jnp.maximum(jnp.sum(counted) * heads, 1.0)


def uniform_first_token_share(documents, valid):
    """What `first_token_attention` would be if every query spread its attention evenly over
    the tokens it may see (1 / its position in the document, plus one): the mass above which
    the first token is a sink. documents / valid [B, T]."""
    position = jnp.arange(documents.shape[1])
    first = jnp.argmax(documents[:, :, None] == documents[:, None, :], axis=-1)  # [B, T]
    counted = (valid & (first != position[None])).astype(jnp.float32)
    share = 1.0 / (position[None] - first + 1).astype(jnp.float32)
    return jnp.sum(share * counted) / jnp.maximum(jnp.sum(counted), 1.0)


def probe(model, batch: Batch) -> dict[str, jnp.ndarray]:
    """{"first_token_attention" [attention layers], "first_token_uniform" [] (the same for
    evenly spread attention), "max_activation" and "median_activation" [layers + 1] (of |h|
    over the valid tokens: the embedding output, then each layer's), "hidden"}."""
    config = model.config
    rotary = rotary_tables(batch.positions, config, compute_dtype(config))
    documents = document_index(batch.segment_ids)
    h = model.embed_tokens(batch.input_ids)
    sinks, largest, median = [], [], []

    def measure(h):
        magnitude = jnp.abs(h.astype(jnp.float32))
        largest.append(jnp.max(jnp.where(batch.valid[..., None], magnitude, 0.0)))
        median.append(jnp.nanmedian(jnp.where(batch.valid[..., None], magnitude, jnp.nan)))

    measure(h)
    graph, stacked = nnx.split(model.blocks)
    for index in range(config.num_blocks):
        block = nnx.merge(graph, jax.tree.map(lambda x: x[index], stacked))
        for layer in block.layers:
            x = layer.input_layernorm(h)
            if layer.is_linear:
                h = h + layer.mixer(x, segment_ids=batch.segment_ids)
            else:
                mixer = layer.mixer
                query, key, value, gate = mixer.project(x, rotary)
                sinks.append(first_token_attention(query, key, documents, batch.valid,
                                                   config.head_dim ** -0.5))
                h = h + mixer.finish(mixer.attend(query, key, value, documents), gate)
            h, _ = layer.feed_forward(h, valid=batch.valid)
            measure(h)
    return {"first_token_attention": jnp.stack(sinks) if sinks else jnp.zeros((0,)),
            "first_token_uniform": uniform_first_token_share(documents, batch.valid),
            "max_activation": jnp.stack(largest),
            "median_activation": jnp.stack(median),
            "hidden": model.final_norm(h)}


def probe_params(graphdef, params, batch: Batch) -> dict[str, float | list[float]]:
    """The probe of a trained state's parameters, as plain numbers."""
    out = jax.jit(lambda p, b: probe(nnx.merge(graphdef, p), b))(params, batch)
    return {"first_token_attention": [float(x) for x in out["first_token_attention"]],
            "first_token_uniform": float(out["first_token_uniform"]),
            "max_activation": [float(x) for x in out["max_activation"]],
            "median_activation": [float(x) for x in out["median_activation"]]}
