"""The gated delta rule in chunks of C tokens: the WY/UT form of spec section 2.4.

Per chunk, with in-chunk cumulative log-decay gamma, chunk-start state S0 and same-document
masks (packed rows), the recurrence unrolls to

    (I + L) U = diag(beta) V - diag(beta * e^gamma * cont) K S0,
    L[s, j]   = beta_s e^(gamma_s - gamma_j) k_s.k_j   for j < s in the same document,
    O         = (Q * e^gamma * cont) S0 + ((Q K^T) * Gamma) U,
    S_end     = e^(gamma_last) cont_last S0 + (K * e^(gamma_last - gamma) * same_last)^T U,

where `cont` marks rows still in the document the chunk started in (S0 belongs to it) and
Gamma[r, s] = e^(gamma_r - gamma_s) for s <= r in the same document. Everything that does not
depend on S0 is computed for all chunks at once; only `V_new = U_pre - W S0` and the state
update run sequentially under `lax.scan`. Every exponent is <= 0, so nothing overflows.

Heads stay grouped as [Hk, r] (value head h = key head h // r, sub-head h % r) so K K^T and
Q K^T are computed once per key head and shared by its r value heads.
"""

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(spec, *operands):
    return jnp.einsum(spec, *operands, precision=HIGHEST)


def unit_lower_inverse(lower: jnp.ndarray) -> jnp.ndarray:
    """(I + L)^-1 for strictly lower-triangular L [..., C, C], C a power of two.

    Recursive block inversion, inv([[A, 0], [X, D]]) = [[A^-1, 0], [-D^-1 X A^-1, D^-1]],
    from 1x1 blocks up in log2(C) levels of batched matmuls. Only matmuls: no LAPACK call
    (on XLA:CPU, triangular_solve goes to OpenBLAS' trsm, which we saw deadlock inside XLA's
    thread pool), and the same shape of work a GPU/TPU wants.
    """
    size = lower.shape[-1]
    batch_shape = lower.shape[:-2]
    inverse = jnp.ones(batch_shape + (size, 1, 1), lower.dtype)  # the 1x1 diagonal blocks
    block = 1
    while block < size:
        pairs = size // (2 * block)
        inverse = inverse.reshape(batch_shape + (pairs, 2, block, block))
        upper_inv, lower_inv = inverse[..., 0, :, :], inverse[..., 1, :, :]
        starts = np.arange(pairs) * 2 * block
        rows = (starts[:, None] + block + np.arange(block))[:, :, None]  # [pairs, block, 1]
        cols = (starts[:, None] + np.arange(block))[:, None, :]  # [pairs, 1, block]
        coupling = lower[..., rows, cols]  # [..., pairs, block, block]
        off = -_einsum("...ij,...jk,...kl->...il", lower_inv, coupling, upper_inv)
        top = jnp.concatenate([upper_inv, jnp.zeros_like(upper_inv)], axis=-1)
        bottom = jnp.concatenate([off, lower_inv], axis=-1)
        inverse = jnp.concatenate([top, bottom], axis=-2)  # [..., pairs, 2 block, 2 block]
        block *= 2
    return inverse.reshape(batch_shape + (size, size))


def delta_rule_chunked(q, k, v, g, beta, docs, initial_state, *, chunk_size=64):
    """All inputs fp32; docs [B, T] monotone document indices. Returns (o, final_state)."""
    batch, length, key_heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2:]
    group = value_heads // key_heads
    size = chunk_size
    if size & (size - 1):
        raise ValueError(f"chunk_size must be a power of two, got {size}")
    num_chunks = -(-length // size)
    pad = num_chunks * size - length
    if pad:
        # Padded steps have beta = 0 and g = 0 and stay in the last document: no write, no decay.
        zero_pad = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, g, beta = map(zero_pad, (q, k, v, g, beta))
        docs = jnp.pad(docs, [(0, 0), (0, pad)], mode="edge")

    # Chunked layouts: keys [B, Hk, N, C, dk]; per value head [B, Hk, r, N, C, ...].
    q = q.reshape(batch, num_chunks, size, key_heads, key_dim).transpose(0, 3, 1, 2, 4)
    k = k.reshape(batch, num_chunks, size, key_heads, key_dim).transpose(0, 3, 1, 2, 4)
    v = v.reshape(batch, num_chunks, size, key_heads, group, value_dim).transpose(0, 3, 4, 1, 2, 5)
    g = g.reshape(batch, num_chunks, size, key_heads, group).transpose(0, 3, 4, 1, 2)
    beta = beta.reshape(batch, num_chunks, size, key_heads, group).transpose(0, 3, 4, 1, 2)
    docs = docs.reshape(batch, num_chunks, size)

    # Document structure per chunk, broadcast over heads: [B, 1, 1, N, C(, C)].
    start_doc = jnp.concatenate([docs[:, :1, 0], docs[:, :-1, -1]], axis=1)  # doc of S0
    cont = (docs == start_doc[:, :, None])[:, None, None]
    same_doc = (docs[:, :, :, None] == docs[:, :, None, :])[:, None, None]
    same_as_last = (docs == docs[:, :, -1:])[:, None, None]
    causal = jnp.tril(jnp.ones((size, size), bool))
    strictly_causal = jnp.tril(jnp.ones((size, size), bool), -1)

    gamma = jnp.cumsum(g, axis=-1)  # [B, Hk, r, N, C]
    gamma_last = gamma[..., -1:]
    diff = gamma[..., :, None] - gamma[..., None, :]
    decay = jnp.exp(jnp.where(causal & same_doc, diff, -jnp.inf))  # Gamma, [B, Hk, r, N, C, C]
    start_decay = jnp.where(cont, jnp.exp(gamma), 0.0)  # e^gamma on rows that see S0

    key_gram = _einsum("bhncd,bhnsd->bhncs", k, k)[:, :, None]  # [B, Hk, 1, N, C, C]
    lower = jnp.where(strictly_causal, beta[..., None] * key_gram * decay, 0.0)
    transform = unit_lower_inverse(lower)  # T = (I + L)^-1, [B, Hk, r, N, C, C]

    values_pre = _einsum("...cs,...sv->...cv", transform, beta[..., None] * v)  # U_pre
    keys_decayed = (beta * start_decay)[..., None] * k[:, :, None]
    state_weights = _einsum("...cs,...sk->...ck", transform, keys_decayed)  # W [.., C, dk]

    scores = _einsum("bhncd,bhnsd->bhncs", q, k)[:, :, None] * decay  # [B, Hk, r, N, C, C]
    queries_decayed = start_decay[..., None] * q[:, :, None]  # [B, Hk, r, N, C, dk]
    end_decay = jnp.where(same_as_last, jnp.exp(gamma_last - gamma), 0.0)
    keys_to_end = end_decay[..., None] * k[:, :, None]  # [B, Hk, r, N, C, dk]
    carry_decay = jnp.where(cont[..., -1], jnp.exp(gamma_last[..., 0]), 0.0)  # [B, Hk, r, N]

    def chunk_step(state, chunk):  # state [B, Hk, r, dk, dv]
        u_pre, w, q_dec, score, k_end, carry = chunk
        u = u_pre - _einsum("bhrck,bhrkv->bhrcv", w, state)
        out = _einsum("bhrck,bhrkv->bhrcv", q_dec, state) + _einsum("bhrcs,bhrsv->bhrcv", score, u)
        state = carry[..., None, None] * state + _einsum("bhrck,bhrcv->bhrkv", k_end, u)
        return state, out

    chunk_major = [
        jnp.moveaxis(x, 3, 0)
        for x in (values_pre, state_weights, queries_decayed, scores, keys_to_end, carry_decay)
    ]
    state0 = initial_state.reshape(batch, key_heads, group, key_dim, value_dim)
    final_state, out = jax.lax.scan(chunk_step, state0, chunk_major)
    # out: [N, B, Hk, r, C, dv] -> [B, N*C, Hv, dv]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, num_chunks * size, value_heads, value_dim)
    final_state = final_state.reshape(batch, value_heads, key_dim, value_dim)
    return out[:, :length], final_state
