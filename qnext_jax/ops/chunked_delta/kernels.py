"""The Pallas calls of the chunked gated delta rule: three forward kernels, two backward ones.

Layouts (head-major, length padded to a multiple of the chunk C, N = T / C chunks):
    q, k       [B, Hk, T, dk]     compute dtype (bf16 or fp32)
    v, u, w    [B, Hv, T, d]      compute dtype
    per token  [B, Hv, N, C, 1]   "col" view and [B, Hv, N, 1, C] "row" view of the same fp32
               data (a free reshape), so a kernel never transposes a vector
    docs       [B, N, C, 1] / [B, N, 1, C] int32 monotone document index
    states     [B, Hv, N, dk, dv] the state at the start of every chunk (one per chunk)

Kernels that are parallel over chunks run on a grid (B, Hk, N) and loop over the r = Hv / Hk
value heads of their key head, so q, k, K K^T and Q K^T are loaded and computed once per group.
The two sequential passes (state forward, state gradient backward) have two drivers:
  - "grid": grid (B, Hv, N) with N innermost and sequential, the running state kept in the
    revisited output block (Mosaic TPU keeps it in VMEM; interpret mode runs it in order);
  - "loop": grid (B, Hv, dv / block) and a loop over chunks inside the kernel (Triton: its
    grid is fully parallel, so the order must live inside one program).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qnext_jax.ops.chunked_delta import chunk_math as cm

F32 = jnp.float32
BACKENDS = ("mosaic", "triton", "interpret", "interpret_loop")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    chunk: int
    group: int  # value heads per key head
    compute_dtype: jnp.dtype
    backend: str
    value_block: int  # dv tile of the "loop" driver (Triton)
    normalize_qk: bool = False  # L2-normalise q, k (and scale q by dk^-1/2) on load

    def queries(self, q):
        return cm.l2_normalize(q, q.shape[-1] ** -0.5) if self.normalize_qk else q

    def keys(self, k):
        return cm.l2_normalize(k) if self.normalize_qk else k

    @property
    def numerics(self) -> cm.Numerics:
        # fp32 matmuls (the (I + L)^-1 products, fp32 inputs): full precision; on Triton that
        # is three TF32 tensor-core passes rather than the far slower IEEE FMA path.
        precision = jax.lax.Precision.HIGHEST
        if self.backend == "triton":
            precision = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
        return cm.Numerics(self.compute_dtype, fp32_precision=precision)

    @property
    def driver(self) -> str:
        return "loop" if self.backend in ("triton", "interpret_loop") else "grid"

    def call(self, kernel, *, grid, in_specs, out_specs, out_shape, semantics):
        kwargs = {}
        if self.backend == "mosaic":
            from jax.experimental.pallas import tpu as pltpu

            kwargs["compiler_params"] = pltpu.CompilerParams(dimension_semantics=semantics)
        elif self.backend == "triton":
            from jax.experimental.pallas import triton as pl_triton

            kwargs["compiler_params"] = pl_triton.CompilerParams(num_warps=4, num_stages=2)
        else:
            kwargs["interpret"] = True
        return pl.pallas_call(
            kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, **kwargs
        )


PARALLEL3 = ("parallel", "parallel", "parallel")
SEQUENTIAL_LAST = ("parallel", "parallel", "arbitrary")


# ----------------------------------------------------------------------------- block specs
# Chunk-parallel kernels: grid (b, key head, chunk).


def _key_tile(cfg, dim):
    return pl.BlockSpec((None, None, cfg.chunk, dim), lambda b, h, n: (b, h, n, 0))


def _group_tile(cfg, dim):
    return pl.BlockSpec((None, cfg.group, cfg.chunk, dim), lambda b, h, n: (b, h, n, 0))


def _group_col(cfg):
    return pl.BlockSpec((None, cfg.group, None, cfg.chunk, 1), lambda b, h, n: (b, h, n, 0, 0))


def _group_row(cfg):
    return pl.BlockSpec((None, cfg.group, None, 1, cfg.chunk), lambda b, h, n: (b, h, n, 0, 0))


def _group_state(dk, dv, cfg):
    return pl.BlockSpec((None, cfg.group, None, dk, dv), lambda b, h, n: (b, h, n, 0, 0))


def _docs_col(cfg):
    return pl.BlockSpec((None, None, cfg.chunk, 1), lambda b, h, n: (b, n, 0, 0))


def _docs_row(cfg):
    return pl.BlockSpec((None, None, 1, cfg.chunk), lambda b, h, n: (b, n, 0, 0))


def _per_token_views(cfg, x):
    """[B, Hv, T] -> (col [B, Hv, N, C, 1], row [B, Hv, N, 1, C])."""
    shape = x.shape[:-1] + (x.shape[-1] // cfg.chunk,)
    return x.reshape(shape + (cfg.chunk, 1)), x.reshape(shape + (1, cfg.chunk))


def _docs_views(cfg, docs):
    shape = docs.shape[:-1] + (docs.shape[-1] // cfg.chunk,)
    return docs.reshape(shape + (cfg.chunk, 1)), docs.reshape(shape + (1, cfg.chunk))


# ----------------------------------------------------------------------------- forward


def prepare(cfg, k, v, beta, gamma, start, docs):
    """U = A (beta V), W = A (beta start K) for every chunk: [B, Hv, T, dv], [B, Hv, T, dk]."""
    batch, key_heads, length, dk = k.shape
    value_heads, dv = v.shape[1], v.shape[3]
    beta_col, _ = _per_token_views(cfg, beta)
    gamma_col, gamma_row = _per_token_views(cfg, gamma)
    start_col, _ = _per_token_views(cfg, start)
    docs_col, docs_row = _docs_views(cfg, docs)

    def kernel(k_ref, v_ref, beta_ref, gcol_ref, grow_ref, start_ref, dcol_ref, drow_ref, u_ref, w_ref):
        k_tile = cfg.keys(k_ref[...])
        mask = cm.causal_same_doc(dcol_ref[...], drow_ref[...])
        for j in range(cfg.group):
            transform, _, _ = cm.wy_transform(
                k_tile, beta_ref[j], gcol_ref[j], grow_ref[j], mask, cfg.numerics
            )
            u, w = cm.prepare(k_tile, v_ref[j], beta_ref[j], start_ref[j], transform, cfg.numerics)
            u_ref[j] = u.astype(u_ref.dtype)
            w_ref[j] = w.astype(w_ref.dtype)

    return cfg.call(
        kernel,
        grid=(batch, key_heads, length // cfg.chunk),
        in_specs=[_key_tile(cfg, dk), _group_tile(cfg, dv), _group_col(cfg), _group_col(cfg),
                  _group_row(cfg), _group_col(cfg), _docs_col(cfg), _docs_row(cfg)],
        out_specs=[_group_tile(cfg, dv), _group_tile(cfg, dk)],
        out_shape=[jax.ShapeDtypeStruct((batch, value_heads, length, dv), cfg.compute_dtype),
                   jax.ShapeDtypeStruct((batch, value_heads, length, dk), cfg.compute_dtype)],
        semantics=PARALLEL3,
    )(k, v, beta_col, gamma_col, gamma_row, start_col, docs_col, docs_row)


def output(cfg, q, k, states, v_new, gamma, start, docs, out_dtype):
    """O = (start Q) S0 + ((Q K^T) * decay) V_new for every chunk: [B, Hv, T, dv]."""
    batch, key_heads, length, dk = q.shape
    value_heads, dv = v_new.shape[1], v_new.shape[3]
    gamma_col, gamma_row = _per_token_views(cfg, gamma)
    start_col, _ = _per_token_views(cfg, start)
    docs_col, docs_row = _docs_views(cfg, docs)

    def kernel(q_ref, k_ref, s_ref, vn_ref, gcol_ref, grow_ref, start_ref, dcol_ref, drow_ref, o_ref):
        q_tile = cfg.queries(q_ref[...])
        q_keys = cm.matmul(q_tile, cfg.keys(k_ref[...]), cfg.numerics, transpose_b=True)
        mask = cm.causal_same_doc(dcol_ref[...], drow_ref[...])
        for j in range(cfg.group):
            scores = q_keys * cm.decay_matrix(gcol_ref[j], grow_ref[j], mask)
            out = cm.output(q_tile, s_ref[j], vn_ref[j], start_ref[j], scores, cfg.numerics)
            o_ref[j] = out.astype(o_ref.dtype)

    return cfg.call(
        kernel,
        grid=(batch, key_heads, length // cfg.chunk),
        in_specs=[_key_tile(cfg, dk), _key_tile(cfg, dk), _group_state(dk, dv, cfg),
                  _group_tile(cfg, dv), _group_col(cfg), _group_row(cfg), _group_col(cfg),
                  _docs_col(cfg), _docs_row(cfg)],
        out_specs=_group_tile(cfg, dv),
        out_shape=jax.ShapeDtypeStruct((batch, value_heads, length, dv), out_dtype),
        semantics=PARALLEL3,
    )(q, k, states, v_new, gamma_col, gamma_row, start_col, docs_col, docs_row)


def state_pass(cfg, u, w, k, start, end, initial_state):
    """The sequential pass: (V_new [B, Hv, T, dv], states [B, Hv, N, dk, dv], final fp32)."""
    batch, value_heads, length, dv = u.shape
    dk = w.shape[3]
    num_chunks = length // cfg.chunk
    start_col, _ = _per_token_views(cfg, start)
    end_col, _ = _per_token_views(cfg, end)
    out_shape = [
        jax.ShapeDtypeStruct(u.shape, cfg.compute_dtype),
        jax.ShapeDtypeStruct((batch, value_heads, num_chunks, dk, dv), cfg.compute_dtype),
        jax.ShapeDtypeStruct((batch, value_heads, dk, dv), F32),
    ]
    step = functools.partial(cm.state_step, numerics=cfg.numerics)
    group = cfg.group
    if cfg.driver == "grid":
        C = cfg.chunk

        def kernel(u_ref, w_ref, k_ref, start_ref, end_ref, s0_ref, vn_ref, states_ref, final_ref):
            @pl.when(pl.program_id(2) == 0)
            def _():
                final_ref[...] = s0_ref[...]

            state = final_ref[...]
            states_ref[...] = state.astype(states_ref.dtype)
            v_new, state = step(
                state, u_ref[...], w_ref[...], cfg.keys(k_ref[...]), start_ref[...], end_ref[...]
            )
            vn_ref[...] = v_new.astype(vn_ref.dtype)
            final_ref[...] = state

        tile = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, n: (b, h, n, 0))
        col = pl.BlockSpec((None, None, None, C, 1), lambda b, h, n: (b, h, n, 0, 0))
        whole_state = pl.BlockSpec((None, None, dk, dv), lambda b, h, n: (b, h, 0, 0))
        return cfg.call(
            kernel,
            grid=(batch, value_heads, num_chunks),
            in_specs=[tile(dv), tile(dk),
                      pl.BlockSpec((None, None, C, dk), lambda b, h, n: (b, jax.lax.div(h, group), n, 0)),
                      col, col, whole_state],
            out_specs=[tile(dv),
                       pl.BlockSpec((None, None, None, dk, dv), lambda b, h, n: (b, h, n, 0, 0)),
                       whole_state],
            out_shape=out_shape,
            semantics=SEQUENTIAL_LAST,
        )(u, w, k, start_col, end_col, initial_state)

    C, block = cfg.chunk, min(cfg.value_block, dv)

    def kernel(u_ref, w_ref, k_ref, start_ref, end_ref, s0_ref, vn_ref, states_ref, final_ref):
        def body(n, state):
            rows = pl.ds(pl.multiple_of(n * C, C), C)
            states_ref[n] = state.astype(states_ref.dtype)
            v_new, state = step(state, u_ref[rows, :], w_ref[rows, :], cfg.keys(k_ref[rows, :]),
                                start_ref[n], end_ref[n])
            vn_ref[rows, :] = v_new.astype(vn_ref.dtype)
            return state

        final_ref[...] = jax.lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(F32))

    whole = lambda d, blocked: pl.BlockSpec(
        (None, None, length, d), lambda b, h, j: (b, h, 0, j if blocked else 0)
    )
    col = pl.BlockSpec((None, None, num_chunks, C, 1), lambda b, h, j: (b, h, 0, 0, 0))
    state_tile = pl.BlockSpec((None, None, dk, block), lambda b, h, j: (b, h, 0, j))
    return cfg.call(
        kernel,
        grid=(batch, value_heads, dv // block),
        in_specs=[whole(block, True), whole(dk, False),
                  pl.BlockSpec((None, None, length, dk), lambda b, h, j: (b, jax.lax.div(h, group), 0, 0)),
                  col, col, state_tile],
        out_specs=[whole(block, True),
                   pl.BlockSpec((None, None, num_chunks, dk, block), lambda b, h, j: (b, h, 0, 0, j)),
                   state_tile],
        out_shape=out_shape,
        semantics=None,
    )(u, w, k, start_col, end_col, initial_state)


# ----------------------------------------------------------------------------- backward


def state_pass_backward(cfg, d_final, d_out, w, q, k, gamma, start, end, docs):
    """The reverse pass: (dV_new [B, Hv, T, dv] fp32, dS_end per chunk [B, Hv, N, dk, dv],
    d initial state fp32). dS_end of chunk n is the gradient of the state after chunk n."""
    batch, value_heads, length, dv = d_out.shape
    dk = w.shape[3]
    num_chunks = length // cfg.chunk
    group = cfg.group
    gamma_col, gamma_row = _per_token_views(cfg, gamma)
    start_col, _ = _per_token_views(cfg, start)
    end_col, _ = _per_token_views(cfg, end)
    docs_col, docs_row = _docs_views(cfg, docs)
    out_shape = [
        jax.ShapeDtypeStruct(d_out.shape, F32),
        jax.ShapeDtypeStruct((batch, value_heads, num_chunks, dk, dv), cfg.compute_dtype),
        jax.ShapeDtypeStruct((batch, value_heads, dk, dv), F32),
    ]

    def chunk(d_state, d_out_tile, w_tile, q_tile, k_tile, gcol, grow, start_c, end_c, dcol, drow):
        q_tile, k_tile = cfg.queries(q_tile), cfg.keys(k_tile)
        q_keys = cm.matmul(q_tile, k_tile, cfg.numerics, transpose_b=True)
        scores = q_keys * cm.decay_matrix(gcol, grow, cm.causal_same_doc(dcol, drow))
        return cm.state_step_backward(
            d_state, d_out_tile, w_tile, k_tile, q_tile, start_c, end_c, scores, cfg.numerics
        )

    C = cfg.chunk
    if cfg.driver == "grid":
        last = num_chunks - 1

        def kernel(do_ref, w_ref, q_ref, k_ref, gcol_ref, grow_ref, start_ref, end_ref, dcol_ref,
                   drow_ref, dfinal_ref, dvn_ref, dstates_ref, dinit_ref):
            @pl.when(pl.program_id(2) == 0)
            def _():
                dinit_ref[...] = dfinal_ref[...]

            d_state = dinit_ref[...]
            dstates_ref[...] = d_state.astype(dstates_ref.dtype)
            d_v_new, d_state = chunk(
                d_state, do_ref[...], w_ref[...], q_ref[...], k_ref[...], gcol_ref[...],
                grow_ref[...], start_ref[...], end_ref[...], dcol_ref[...], drow_ref[...],
            )
            dvn_ref[...] = d_v_new
            dinit_ref[...] = d_state

        tile = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, n: (b, h, last - n, 0))
        key = pl.BlockSpec((None, None, C, dk), lambda b, h, n: (b, jax.lax.div(h, group), last - n, 0))
        col = pl.BlockSpec((None, None, None, C, 1), lambda b, h, n: (b, h, last - n, 0, 0))
        row = pl.BlockSpec((None, None, None, 1, C), lambda b, h, n: (b, h, last - n, 0, 0))
        dcol = pl.BlockSpec((None, None, C, 1), lambda b, h, n: (b, last - n, 0, 0))
        drow = pl.BlockSpec((None, None, 1, C), lambda b, h, n: (b, last - n, 0, 0))
        whole_state = pl.BlockSpec((None, None, dk, dv), lambda b, h, n: (b, h, 0, 0))
        return cfg.call(
            kernel,
            grid=(batch, value_heads, num_chunks),
            in_specs=[tile(dv), tile(dk), key, key, col, row, col, col, dcol, drow, whole_state],
            out_specs=[tile(dv),
                       pl.BlockSpec((None, None, None, dk, dv),
                                    lambda b, h, n: (b, h, last - n, 0, 0)),
                       whole_state],
            out_shape=out_shape,
            semantics=SEQUENTIAL_LAST,
        )(d_out, w, q, k, gamma_col, gamma_row, start_col, end_col, docs_col, docs_row, d_final)

    block = min(cfg.value_block, dv)

    def kernel(do_ref, w_ref, q_ref, k_ref, gcol_ref, grow_ref, start_ref, end_ref, dcol_ref,
               drow_ref, dfinal_ref, dvn_ref, dstates_ref, dinit_ref):
        def body(i, d_state):
            n = num_chunks - 1 - i
            rows = pl.ds(pl.multiple_of(n * C, C), C)
            dstates_ref[n] = d_state.astype(dstates_ref.dtype)
            d_v_new, d_state = chunk(
                d_state, do_ref[rows, :], w_ref[rows, :], q_ref[rows, :], k_ref[rows, :],
                gcol_ref[n], grow_ref[n], start_ref[n], end_ref[n], dcol_ref[n], drow_ref[n],
            )
            dvn_ref[rows, :] = d_v_new
            return d_state

        dinit_ref[...] = jax.lax.fori_loop(0, num_chunks, body, dfinal_ref[...].astype(F32))

    whole = lambda d, blocked: pl.BlockSpec(
        (None, None, length, d), lambda b, h, j: (b, h, 0, j if blocked else 0)
    )
    key = pl.BlockSpec((None, None, length, dk), lambda b, h, j: (b, jax.lax.div(h, group), 0, 0))
    col = pl.BlockSpec((None, None, num_chunks, C, 1), lambda b, h, j: (b, h, 0, 0, 0))
    row = pl.BlockSpec((None, None, num_chunks, 1, C), lambda b, h, j: (b, h, 0, 0, 0))
    dcol = pl.BlockSpec((None, num_chunks, C, 1), lambda b, h, j: (b, 0, 0, 0))
    drow = pl.BlockSpec((None, num_chunks, 1, C), lambda b, h, j: (b, 0, 0, 0))
    state_tile = pl.BlockSpec((None, None, dk, block), lambda b, h, j: (b, h, 0, j))
    return cfg.call(
        kernel,
        grid=(batch, value_heads, dv // block),
        in_specs=[whole(block, True), whole(dk, False), key, key, col, row, col, col, dcol, drow,
                  state_tile],
        out_specs=[whole(block, True),
                   pl.BlockSpec((None, None, num_chunks, dk, block), lambda b, h, j: (b, h, 0, 0, j)),
                   state_tile],
        out_shape=out_shape,
        semantics=None,
    )(d_out, w, q, k, gamma_col, gamma_row, start_col, end_col, docs_col, docs_row, d_final)


def chunk_backward(cfg, q, k, v, beta, gamma, start, end, docs, states, d_states_end, d_out, d_v_new):
    """Per-chunk gradients. Returns dq, dk [B, Hk, T, dk] fp32 (summed over each key head's
    value heads), dv [B, Hv, T, dv] fp32 and, per token [B, Hv, T] fp32, d_beta, d_start,
    d_end and d_gamma."""
    batch, key_heads, length, dk = q.shape
    value_heads, dv = v.shape[1], v.shape[3]
    beta_col, _ = _per_token_views(cfg, beta)
    gamma_col, gamma_row = _per_token_views(cfg, gamma)
    start_col, _ = _per_token_views(cfg, start)
    end_col, _ = _per_token_views(cfg, end)
    docs_col, docs_row = _docs_views(cfg, docs)

    def kernel(q_ref, k_ref, v_ref, beta_ref, gcol_ref, grow_ref, start_ref, end_ref, dcol_ref,
               drow_ref, s_ref, ds_ref, do_ref, dvn_ref,
               dq_ref, dk_ref, dv_ref, dbeta_ref, dstart_ref, dend_ref, dgcol_ref, dgrow_ref):
        q_raw, k_raw = q_ref[...], k_ref[...]
        q_tile, k_tile = cfg.queries(q_raw), cfg.keys(k_raw)
        mask = cm.causal_same_doc(dcol_ref[...], drow_ref[...])
        dq = jnp.zeros(q_tile.shape, F32)
        dk_sum = jnp.zeros(k_tile.shape, F32)
        for j in range(cfg.group):
            grads = cm.chunk_backward(
                q_tile, k_tile, v_ref[j], beta_ref[j], start_ref[j], end_ref[j], gcol_ref[j],
                grow_ref[j], mask, s_ref[j].astype(F32), ds_ref[j].astype(F32), do_ref[j],
                dvn_ref[j], cfg.numerics,
            )
            dq, dk_sum = dq + grads[0], dk_sum + grads[1]
            dv_ref[j], dbeta_ref[j], dstart_ref[j], dend_ref[j], dgcol_ref[j], dgrow_ref[j] = grads[2:]
        if cfg.normalize_qk:
            dq = cm.l2_normalize_backward(q_raw, dq, q_raw.shape[-1] ** -0.5)
            dk_sum = cm.l2_normalize_backward(k_raw, dk_sum)
        dq_ref[...] = dq
        dk_ref[...] = dk_sum

    num_chunks = length // cfg.chunk
    per_token_col = jax.ShapeDtypeStruct((batch, value_heads, num_chunks, cfg.chunk, 1), F32)
    dq, dk, dv, d_beta, d_start, d_end, d_gamma_col, d_gamma_row = cfg.call(
        kernel,
        grid=(batch, key_heads, num_chunks),
        in_specs=[_key_tile(cfg, dk), _key_tile(cfg, dk), _group_tile(cfg, dv), _group_col(cfg),
                  _group_col(cfg), _group_row(cfg), _group_col(cfg), _group_col(cfg),
                  _docs_col(cfg), _docs_row(cfg), _group_state(dk, dv, cfg),
                  _group_state(dk, dv, cfg), _group_tile(cfg, dv), _group_tile(cfg, dv)],
        out_specs=[_key_tile(cfg, dk), _key_tile(cfg, dk), _group_tile(cfg, dv), _group_col(cfg),
                   _group_col(cfg), _group_col(cfg), _group_col(cfg), _group_row(cfg)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, F32), jax.ShapeDtypeStruct(k.shape, F32),
                   jax.ShapeDtypeStruct(v.shape, F32), per_token_col, per_token_col,
                   per_token_col, per_token_col,
                   jax.ShapeDtypeStruct((batch, value_heads, num_chunks, 1, cfg.chunk), F32)],
        semantics=PARALLEL3,
    )(q, k, v, beta_col, gamma_col, gamma_row, start_col, end_col, docs_col, docs_row, states,
      d_states_end, d_out, d_v_new)
    flat = lambda x: x.reshape(batch, value_heads, length)
    d_gamma = flat(d_gamma_col) + flat(d_gamma_row)
    return dq, dk, dv, flat(d_beta), flat(d_start), flat(d_end), d_gamma
