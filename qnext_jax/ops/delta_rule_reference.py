"""The gated delta rule as its recurrence, one token at a time under `lax.scan` (spec 2.3).

Slow and exact: the reference the chunked and Pallas implementations are tested against.
"""

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def delta_rule_reference(q, k, v, g, beta, docs, initial_state):
    """All inputs fp32; docs [B, T] document indices (equal = same document)."""
    group = v.shape[2] // q.shape[2]
    q = jnp.repeat(q, group, axis=2)  # [B, T, Hv, dk]: value head h reads key head h // group
    k = jnp.repeat(k, group, axis=2)
    starts = jnp.concatenate(
        [jnp.zeros_like(docs[:, :1], dtype=bool), docs[:, 1:] != docs[:, :-1]], axis=1
    )

    def step(state, inputs):
        q_t, k_t, v_t, g_t, beta_t, start_t = inputs  # [B, Hv, d...], [B, Hv], [B]
        state = jnp.where(start_t[:, None, None, None], 0.0, state)
        return delta_rule_step(state, q_t, k_t, v_t, g_t, beta_t)

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta, starts)]
    final_state, out = jax.lax.scan(step, initial_state, time_major)
    return jnp.moveaxis(out, 0, 1), final_state


def delta_rule_step(state, q_t, k_t, v_t, g_t, beta_t):
    """One token of the recurrence for every (row, value head): state [B, Hv, dk, dv];
    q_t, k_t [B, Hv, dk]; v_t [B, Hv, dv]; g_t, beta_t [B, Hv], all fp32.
    Returns (the state after the token, its output [B, Hv, dv])."""
    state = state * jnp.exp(g_t)[..., None, None]
    predicted = jnp.einsum("BHKV,BHK->BHV", state, k_t, precision=HIGHEST)
    delta = beta_t[..., None] * (v_t - predicted)  # [B, Hv, dv]
    state = state + jnp.einsum("BHK,BHV->BHKV", k_t, delta, precision=HIGHEST)
    out = jnp.einsum("BHKV,BHK->BHV", state, q_t, precision=HIGHEST)
    return state, out
