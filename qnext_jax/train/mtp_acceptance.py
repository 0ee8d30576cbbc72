"""The MTP acceptance rate, teacher-forced: how often the depth-k draft at position i (the MTP
chain fed the true tokens i+1 .. i+k) equals the main model's greedy token at position i+k.
Both predict token i+k+1 from the same tokens, so this is the rate at which greedy speculative
decoding accepts a depth-k draft once the drafts before it were accepted: a direct measure of
what the MTP module is trained for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qnext_jax.train.losses import mtp_targets


def greedy_tokens(hidden, head, chunk_tokens: int = 1024):
    """argmax of the head's logits for hidden [B, T, E] -> [B, T] int32, a chunk of tokens at
    a time (never the whole [B, T, V] logits). head: model.head_weight()."""
    weight, vocab_major = head
    batch, length, width = hidden.shape
    flat = hidden.reshape(-1, width).astype(weight.dtype)
    chunk = min(chunk_tokens, flat.shape[0])
    pad = -flat.shape[0] % chunk
    chunks = jnp.pad(flat, [(0, pad), (0, 0)]).reshape(-1, chunk, width)
    spec = "NE,VE->NV" if vocab_major else "NE,EV->NV"
    argmax = jax.lax.map(
        lambda x: jnp.argmax(jnp.einsum(spec, x, weight, preferred_element_type=jnp.float32),
                             axis=-1).astype(jnp.int32), chunks)
    return argmax.reshape(-1)[: batch * length].reshape(batch, length)


def draft_matches(main_greedy, draft_greedy, depth: int):
    """[B, T] bool: the depth-k draft at i equals the main model's greedy token at i+k (False
    for the last k positions, which have no main prediction to compare with)."""
    shift = min(depth, main_greedy.shape[1])
    ahead = jnp.pad(main_greedy[:, shift:], [(0, 0), (0, shift)], constant_values=-1)
    return draft_greedy == ahead


def acceptance_counts(output, batch, head) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(matches [D], positions counted [D]) over a batch, from a model output with the MTP
    module run (hidden states or logits). Counted are the positions whose MTP loss counts:
    token i to the target i+k+1 inside one document, no padding."""
    main = _greedy(output.logits, output.hidden, head)
    matches, counted = [], []
    for k, (logits, hidden) in enumerate(_mtp_outputs(output), start=1):
        _, mask = mtp_targets(batch, k)
        hit = draft_matches(main, _greedy(logits, hidden, head), k)
        matches.append(jnp.sum(hit * mask))
        counted.append(jnp.sum(mask))
    return jnp.stack(matches).astype(jnp.float32), jnp.stack(counted).astype(jnp.float32)


def _greedy(logits, hidden, head):
    if logits is not None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return greedy_tokens(hidden, head)


def _mtp_outputs(output):
    depths = max(len(output.mtp_logits), len(output.mtp_hidden))
    for k in range(depths):
        yield (output.mtp_logits[k] if output.mtp_logits else None,
               output.mtp_hidden[k] if output.mtp_hidden else None)
