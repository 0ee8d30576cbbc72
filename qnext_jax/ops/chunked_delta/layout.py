"""What both chunked drivers (XLA and Pallas) do before the chunk algebra: pad the length to a
multiple of the chunk and turn log-decays and documents into per-token decay factors."""

import jax
import jax.numpy as jnp


def pad_to_chunks(q, k, v, g, beta, docs, chunk):
    """Pads [B, T, ...] inputs to a multiple of `chunk` tokens. Padded steps have beta = 0 and
    g = 0 and stay in the last document: they neither write nor decay the state."""
    length = q.shape[1]
    pad = -length % chunk
    if pad:
        zero_pad = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, g, beta = map(zero_pad, (q, k, v, g, beta))
        docs = jnp.pad(docs, [(0, 0), (0, pad)], mode="edge")
    return q, k, v, g, beta, docs


def chunk_decays(g, docs, chunk_axis=-2):
    """g [..., N, ..., C] fp32 log-decays, docs (broadcastable) document indices, with chunks
    along `chunk_axis` and tokens last -> (gamma, start, end), each shaped like g, fp32:

        gamma = in-chunk cumulative sum of g,
        start = e^gamma on tokens of the document the chunk-start state belongs to, else 0,
        end   = e^(gamma_last - gamma) on tokens of the chunk's last document, else 0.

    The chunk-start state belongs to the document of the token before the chunk (for the first
    chunk, to the first token's: the initial state continues that document).
    """
    gamma = jnp.cumsum(g, axis=-1)
    last_docs = docs[..., -1:]
    num_chunks = docs.shape[chunk_axis]
    state_doc = jnp.concatenate(
        [
            jax.lax.slice_in_dim(docs[..., :1], 0, 1, axis=chunk_axis),
            jax.lax.slice_in_dim(last_docs, 0, num_chunks - 1, axis=chunk_axis),
        ],
        axis=chunk_axis,
    )
    start = jnp.where(docs == state_doc, jnp.exp(gamma), 0.0)
    end = jnp.where(docs == last_docs, jnp.exp(gamma[..., -1:] - gamma), 0.0)
    return gamma, start, end
