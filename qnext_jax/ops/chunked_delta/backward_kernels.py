"""The five backward Pallas calls of the chunked gated delta rule (layouts, drivers and block
specs: kernels.py): `local_dv`, `state_pass_backward` (sequential, reverse), `output_backward`
and `wy_backward`; the backward also re-runs the forward's `prepare` from the stored A."""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl

from qnext_jax.ops.chunked_delta import chunk_math as cm
from qnext_jax.ops.chunked_delta.kernels import (
    F32, SEQUENTIAL_LAST, chunk_parallel, col_spec, docs_col_spec, docs_row_spec, docs_views,
    per_token_views, row_spec, state_spec, tile_spec, whole_spec,
)


def _per_token_outputs(cfg, gamma_col, gamma_row):
    """Output specs and shapes of per-token fp32 gradients: three [C, 1] columns, one [1, C] row."""
    col = (col_spec(cfg), jax.ShapeDtypeStruct(gamma_col.shape, F32))
    return [col, col, col, (row_spec(cfg), jax.ShapeDtypeStruct(gamma_row.shape, F32))]



def local_dv(cfg, q, k, d_out, gamma, docs):
    """((K Q^T) * decay^T) dO for every chunk: the intra-chunk part of dV_new, fp32."""
    dk, dv = q.shape[-1], d_out.shape[-1]
    batch, value_heads, length = gamma.shape
    gamma_col, gamma_row = per_token_views(cfg, gamma)
    docs_col, docs_row = docs_views(cfg, docs)

    def kernel(q_ref, k_ref, do_ref, grow_ref, dcol_ref, drow_ref, gcol_ref, out_ref):
        out_ref[...] = cm.local_dv(q_ref[...], k_ref[...], do_ref[...], gcol_ref[...],
                                   grow_ref[...], dcol_ref[...], drow_ref[...], cfg.numerics)

    shape = jax.ShapeDtypeStruct(cfg.heads_shape(batch, value_heads, length, dv), F32)
    return chunk_parallel(
        cfg, "local_dv", kernel, gamma.shape, (q, k, d_out, gamma_row, docs_col, docs_row, gamma_col),
        [tile_spec(cfg, dk, key=True), tile_spec(cfg, dk, key=True), tile_spec(cfg, dv), row_spec(cfg),
         docs_col_spec(cfg), docs_row_spec(cfg), col_spec(cfg)],
        [(tile_spec(cfg, dv), shape)],
    )[0]


def state_pass_backward(cfg, d_final, d_out, d_v_local, w, q, k, start, end):
    """The reverse pass: (dV_new per-head [.., dv] fp32, dS_end per chunk [B, Hv, N, dk, dv],
    d initial state fp32). dS_end of chunk n is the gradient of the state after chunk n."""
    batch, value_heads, length = start.shape
    dk, dv = w.shape[-1], d_out.shape[-1]
    num_chunks = length // cfg.chunk
    start_col, _ = per_token_views(cfg, start)
    end_col, _ = per_token_views(cfg, end)
    out_shape = [
        jax.ShapeDtypeStruct(d_v_local.shape, F32),
        jax.ShapeDtypeStruct((batch, value_heads, num_chunks, dk, dv), cfg.compute_dtype),
        jax.ShapeDtypeStruct((batch, value_heads, dk, dv), F32),
    ]
    step = functools.partial(cm.state_step_backward, numerics=cfg.numerics)
    C = cfg.chunk
    if cfg.driver == "grid":
        last = num_chunks - 1

        def kernel(do_ref, dvl_ref, w_ref, q_ref, k_ref, start_ref, end_ref, dfinal_ref,
                   dvn_ref, dstates_ref, dinit_ref):
            @pl.when(pl.program_id(2) == 0)
            def _():
                dinit_ref[...] = dfinal_ref[...]

            d_state = dinit_ref[...]
            dstates_ref[...] = d_state.astype(dstates_ref.dtype)
            d_v_new, d_state = step(d_state, do_ref[...], dvl_ref[...], w_ref[...], k_ref[...],
                                    q_ref[...], start_ref[...], end_ref[...])
            dvn_ref[...] = d_v_new
            dinit_ref[...] = d_state

        reverse = lambda spec: pl.BlockSpec(  # noqa: E731
            spec.block_shape, lambda b, h, n: spec.index_map(b, h, last - n))
        whole_state = pl.BlockSpec((None, None, dk, dv), lambda b, h, n: (b, h, 0, 0))
        return cfg.call(
            kernel, name="state_pass_backward",
            grid=(batch, value_heads, num_chunks),
            in_specs=[reverse(tile_spec(cfg, dv)), reverse(tile_spec(cfg, dv)), reverse(tile_spec(cfg, dk)),
                      reverse(tile_spec(cfg, dk, key=True)), reverse(tile_spec(cfg, dk, key=True)),
                      reverse(col_spec(cfg)), reverse(col_spec(cfg)), whole_state],
            out_specs=[reverse(tile_spec(cfg, dv)), reverse(state_spec(dk, dv)), whole_state],
            out_shape=out_shape,
            semantics=SEQUENTIAL_LAST,
        )(d_out, d_v_local, w, q, k, start_col, end_col, d_final)

    block = min(cfg.value_block, dv)

    def kernel(do_ref, dvl_ref, w_ref, q_ref, k_ref, start_ref, end_ref, dfinal_ref,
               dvn_ref, dstates_ref, dinit_ref):
        def body(i, d_state):
            n = num_chunks - 1 - i
            rows = pl.ds(pl.multiple_of(n * C, C), C)
            dstates_ref[n] = d_state.astype(dstates_ref.dtype)
            d_v_new, d_state = step(d_state, do_ref[rows, :], dvl_ref[rows, :], w_ref[rows, :],
                                    k_ref[rows, :], q_ref[rows, :], start_ref[n], end_ref[n])
            dvn_ref[rows, :] = d_v_new
            return d_state

        dinit_ref[...] = jax.lax.fori_loop(0, num_chunks, body, dfinal_ref[...].astype(F32))

    col = pl.BlockSpec((None, None, num_chunks, C, 1), lambda b, h, j: (b, h, 0, 0, 0))
    state_tile = pl.BlockSpec((None, None, dk, block), lambda b, h, j: (b, h, 0, j))
    values = whole_spec(cfg, length, block, blocked=True)
    return cfg.call(
        kernel, name="state_pass_backward",
        grid=(batch, value_heads, dv // block),
        in_specs=[values, values, whole_spec(cfg, length, dk), whole_spec(cfg, length, dk, key=True),
                  whole_spec(cfg, length, dk, key=True), col, col, state_tile],
        out_specs=[values,
                   pl.BlockSpec((None, None, num_chunks, dk, block), lambda b, h, j: (b, h, 0, 0, j)),
                   state_tile],
        out_shape=out_shape,
        semantics=None,
    )(d_out, d_v_local, w, q, k, start_col, end_col, d_final)


def output_backward(cfg, q, k, u, w, states, d_states_end, d_out, gamma, start, end, docs):
    """Gradients through the output and the chunks' state contributions (V_new fixed):
    dq, dk per value head [.., dk] fp32, and per token [B, Hv, T] fp32 d_start, d_end,
    d_gamma."""
    dk, dv = q.shape[-1], u.shape[-1]
    batch, value_heads, length = gamma.shape
    gamma_col, gamma_row = per_token_views(cfg, gamma)
    start_col, _ = per_token_views(cfg, start)
    end_col, _ = per_token_views(cfg, end)
    docs_col, docs_row = docs_views(cfg, docs)

    def kernel(q_ref, k_ref, u_ref, w_ref, s_ref, ds_ref, do_ref, grow_ref, dcol_ref, drow_ref,
               start_ref, end_ref, gcol_ref, dq_ref, dk_ref, dstart_ref, dend_ref, dgcol_ref,
               dgrow_ref):
        state, u, w = s_ref[...].astype(F32), u_ref[...].astype(F32), w_ref[...]
        v_new = u - cm.matmul(w, state, cfg.numerics)
        v_new_t = None
        if cfg.numerics.transpose_by_dot:  # V_new^T = U^T - S0^T W^T from the loaded tiles
            v_new_t = u.T - cm.matmul(state, w, cfg.numerics, transpose_a=True, transpose_b=True)
        (dq_ref[...], dk_ref[...], dstart_ref[...], dend_ref[...], dgcol_ref[...],
         dgrow_ref[...]) = cm.output_backward(
            q_ref[...], k_ref[...], v_new, state, ds_ref[...].astype(F32), do_ref[...],
            start_ref[...], end_ref[...], gcol_ref[...], grow_ref[...], dcol_ref[...],
            drow_ref[...], cfg.numerics, v_new_t=v_new_t)

    per_head = jax.ShapeDtypeStruct(cfg.heads_shape(batch, value_heads, length, dk), F32)
    return chunk_parallel(
        cfg, "output_backward", kernel, gamma.shape,
        (q, k, u, w, states, d_states_end, d_out, gamma_row, docs_col, docs_row, start_col,
         end_col, gamma_col),
        [tile_spec(cfg, dk, key=True), tile_spec(cfg, dk, key=True), tile_spec(cfg, dv), tile_spec(cfg, dk),
         state_spec(dk, dv), state_spec(dk, dv), tile_spec(cfg, dv), row_spec(cfg), docs_col_spec(cfg),
         docs_row_spec(cfg), col_spec(cfg), col_spec(cfg), col_spec(cfg)],
        [(tile_spec(cfg, dk), per_head), (tile_spec(cfg, dk), per_head),
         *_per_token_outputs(cfg, gamma_col, gamma_row)],
    )


def wy_backward(cfg, transform, k, v, beta, gamma, start, docs, states, d_v_new):
    """Gradients through U = A (beta V), W = A (beta start K), A = (I + L)^-1: dk per value
    head [.., dk] fp32, dv [.., dv] fp32, and per token [B, Hv, T] fp32 d_beta, d_start,
    d_gamma."""
    dk, dv = k.shape[-1], v.shape[-1]
    batch, value_heads, length = gamma.shape
    beta_col, beta_row = per_token_views(cfg, beta)
    gamma_col, gamma_row = per_token_views(cfg, gamma)
    start_col, _ = per_token_views(cfg, start)
    docs_col, docs_row = docs_views(cfg, docs)

    def kernel(a_ref, k_ref, v_ref, s_ref, dvn_ref, brow_ref, grow_ref, dcol_ref, drow_ref,
               start_ref, gcol_ref, beta_ref, dk_ref, dv_ref, dbeta_ref, dstart_ref, dgcol_ref,
               dgrow_ref):
        (dk_ref[...], dv_ref[...], dbeta_ref[...], dstart_ref[...], dgcol_ref[...],
         dgrow_ref[...]) = cm.wy_backward(
            k_ref[...], v_ref[...], beta_ref[...], brow_ref[...], start_ref[...], gcol_ref[...],
            grow_ref[...], dcol_ref[...], drow_ref[...], a_ref[...], s_ref[...].astype(F32),
            dvn_ref[...], cfg.numerics)

    per_head = lambda d: jax.ShapeDtypeStruct(  # noqa: E731
        cfg.heads_shape(batch, value_heads, length, d), F32)
    return chunk_parallel(
        cfg, "wy_backward", kernel, gamma.shape,
        (transform, k, v, states, d_v_new, beta_row, gamma_row, docs_col, docs_row, start_col,
         gamma_col, beta_col),
        [tile_spec(cfg, cfg.chunk), tile_spec(cfg, dk, key=True), tile_spec(cfg, dv), state_spec(dk, dv),
         tile_spec(cfg, dv), row_spec(cfg), row_spec(cfg), docs_col_spec(cfg), docs_row_spec(cfg), col_spec(cfg),
         col_spec(cfg), col_spec(cfg)],
        [(tile_spec(cfg, dk), per_head(dk)), (tile_spec(cfg, dv), per_head(dv)),
         *_per_token_outputs(cfg, gamma_col, gamma_row)],
    )
