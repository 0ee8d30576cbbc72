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

HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(spec, *operands):
    return jnp.einsum(spec, *operands, precision=HIGHEST)


def delta_rule_chunked(q, k, v, g, beta, docs, initial_state, *, chunk_size=64):
    """All inputs fp32; docs [B, T] monotone document indices. Returns (o, final_state)."""
    batch, length, key_heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2:]
    group = value_heads // key_heads
    size = chunk_size
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
    system = lower + jnp.eye(size, dtype=lower.dtype)  # I + L, unit lower-triangular

    def solve(rhs):
        return jax.lax.linalg.triangular_solve(
            system, rhs, left_side=True, lower=True, unit_diagonal=True
        )

    values_pre = solve(beta[..., None] * v)  # U_pre [B, Hk, r, N, C, dv]
    keys_decayed = (beta * start_decay)[..., None] * k[:, :, None]
    state_weights = solve(keys_decayed)  # W [B, Hk, r, N, C, dk]

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
