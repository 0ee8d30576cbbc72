"""The Pallas calls of the chunked gated delta rule: four forward kernels, five backward ones.

Forward: `inverse` (A = (I + L)^-1 per chunk, stored) -> `prepare` (U, W) -> `state_pass`
(sequential) -> `output`. Backward: `prepare` again (U, W from the stored A) -> `local_dv`
(the intra-chunk part of dV_new) -> `state_pass_backward` (sequential, reverse) ->
`output_backward` (dq, dk through the output) and `wy_backward` (dk, dv, d_beta through
U and W). Every chunk-parallel kernel runs on a grid (B, Hv, N), one value head a program
(value head h reads key head h // group through its index map), so no kernel unrolls a loop
over heads: that is what kept the old fused backward at 288 KB of shared memory on Hopper.

Layouts: q, k [B, T, Hk, dk], v and the per-head outputs [B, T, Hv, d] in the model's native
layout on the "loop" driver (Triton: a block is a [C, d] tile strided over heads, so nothing
is transposed through HBM), head-major [B, H, T, d] on the "grid" driver (Mosaic TPU, whose
(8, 128) tiling needs the last two block dims to be tokens and features). Per-token vectors
(fp32, prepared by XLA) are [B, Hv, N, C, 1] "col" and [B, Hv, N, 1, C] "row" views of the same
data, so a kernel never transposes a vector; docs [B, N, C, 1] / [B, N, 1, C]; states
[B, Hv, N, dk, dv], the state at the start of every chunk.

The two sequential passes have two drivers:
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
# Triton warps per kernel: 8 where a program holds several [C, d] fp32 accumulators at once
# (4 warps x 255 registers cannot hold them without spilling; checked by
# tests/test_kernel_resources.py with ptxas for sm_90a).
_TRITON_WARPS = {"prepare": 8, "state_pass_backward": 8, "output_backward": 8, "wy_backward": 8}


def triton_warps(kernel_name: str) -> int:
    return _TRITON_WARPS.get(kernel_name, 4)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    chunk: int
    group: int  # value heads per key head
    compute_dtype: jnp.dtype
    backend: str
    value_block: int  # dv tile of the "loop" driver (Triton)

    @property
    def triton_like(self) -> bool:
        """Triton, or interpret mode run the way Triton runs (the CPU test of that path)."""
        return self.backend in ("triton", "interpret_loop")

    @property
    def numerics(self) -> cm.Numerics:
        # Products take compute-dtype operands (bf16 for bf16 training) with fp32 accumulation;
        # fp32 products (fp32 training, the (I + L)^-1 arithmetic) are full precision: on
        # Triton three TF32 tensor-core passes rather than the far slower IEEE FMA path.
        precision = jax.lax.Precision.HIGHEST
        if self.backend == "triton":
            precision = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
        return cm.Numerics(self.compute_dtype, fp32_precision=precision,
                           transpose_by_dot=self.triton_like)

    @property
    def driver(self) -> str:
        return "loop" if self.triton_like else "grid"

    @property
    def native_layout(self) -> bool:
        return self.driver == "loop"

    def heads_shape(self, batch, heads, length, dim):
        """The array shape of a per-head tensor in this config's layout."""
        return (batch, length, heads, dim) if self.native_layout else (batch, heads, length, dim)

    def call(self, kernel, *, name, grid, in_specs, out_specs, out_shape, semantics):
        kwargs = {}
        if self.backend == "mosaic":
            from jax.experimental.pallas import tpu as pltpu

            kwargs["compiler_params"] = pltpu.CompilerParams(dimension_semantics=semantics)
        elif self.backend == "triton":
            from jax.experimental.pallas import triton as pl_triton

            kwargs["compiler_params"] = pl_triton.CompilerParams(
                num_warps=triton_warps(name), num_stages=2)
        else:
            kwargs["interpret"] = True
        kernel.__name__ = kernel.__qualname__ = name  # Triton names its kernel after the function
        return pl.pallas_call(
            kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
            name=name, **kwargs
        )


PARALLEL3 = ("parallel", "parallel", "parallel")
SEQUENTIAL_LAST = ("parallel", "parallel", "arbitrary")


# ----------------------------------------------------------------------------- block specs
# Chunk-parallel kernels: grid (b, value head, chunk).


def _head_of(cfg, key):
    return (lambda h: jax.lax.div(h, cfg.group)) if key else (lambda h: h)


def _tile(cfg, dim, *, key=False):
    """One chunk of one head of a per-head tensor: a [C, dim] block."""
    head = _head_of(cfg, key)
    if cfg.native_layout:
        return pl.BlockSpec((None, cfg.chunk, None, dim), lambda b, h, n: (b, n, head(h), 0))
    return pl.BlockSpec((None, None, cfg.chunk, dim), lambda b, h, n: (b, head(h), n, 0))


def _col(cfg):
    return pl.BlockSpec((None, None, None, cfg.chunk, 1), lambda b, h, n: (b, h, n, 0, 0))


def _row(cfg):
    return pl.BlockSpec((None, None, None, 1, cfg.chunk), lambda b, h, n: (b, h, n, 0, 0))


def _state(dk, dv):
    return pl.BlockSpec((None, None, None, dk, dv), lambda b, h, n: (b, h, n, 0, 0))


def _docs_col(cfg):
    return pl.BlockSpec((None, None, cfg.chunk, 1), lambda b, h, n: (b, n, 0, 0))


def _docs_row(cfg):
    return pl.BlockSpec((None, None, 1, cfg.chunk), lambda b, h, n: (b, n, 0, 0))


# Sequential kernels on the "loop" driver: grid (b, value head, value block), whole length.


def _whole(cfg, length, dim, *, key=False, blocked=False):
    head = _head_of(cfg, key)
    column = (lambda j: j) if blocked else (lambda j: 0)
    if cfg.native_layout:
        return pl.BlockSpec((None, length, None, dim), lambda b, h, j: (b, 0, head(h), column(j)))
    return pl.BlockSpec((None, None, length, dim), lambda b, h, j: (b, head(h), 0, column(j)))


def _per_token_views(cfg, x):
    """[B, Hv, T] -> (col [B, Hv, N, C, 1], row [B, Hv, N, 1, C])."""
    shape = x.shape[:-1] + (x.shape[-1] // cfg.chunk,)
    return x.reshape(shape + (cfg.chunk, 1)), x.reshape(shape + (1, cfg.chunk))


def _docs_views(cfg, docs):
    shape = docs.shape[:-1] + (docs.shape[-1] // cfg.chunk,)
    return docs.reshape(shape + (cfg.chunk, 1)), docs.reshape(shape + (1, cfg.chunk))


def _chunk_parallel(cfg, name, kernel, per_token_shape, args, in_specs, outputs):
    """Runs `kernel` on the grid (B, Hv, N) of per-token tensors [B, Hv, T]; outputs:
    [(BlockSpec, ShapeDtypeStruct)]."""
    batch, value_heads, length = per_token_shape
    return cfg.call(
        kernel, name=name, grid=(batch, value_heads, length // cfg.chunk), in_specs=in_specs,
        out_specs=[spec for spec, _ in outputs], out_shape=[shape for _, shape in outputs],
        semantics=PARALLEL3,
    )(*args)


# ----------------------------------------------------------------------------- forward


def inverse(cfg, k, beta, gamma, docs):
    """A = (I + L)^-1 of every chunk and value head, [*heads_shape(B, Hv, T, C)] in the compute
    dtype: computed once, read by `prepare` in the forward and again in the backward."""
    batch, value_heads, length = beta.shape
    dk = k.shape[-1]
    beta_col, _ = _per_token_views(cfg, beta)
    gamma_col, gamma_row = _per_token_views(cfg, gamma)
    docs_col, docs_row = _docs_views(cfg, docs)
    numerics = cfg.numerics
    size = cm.INVERSE_BLOCK

    def kernel(k_ref, gcol_ref, grow_ref, dcol_ref, drow_ref, beta_ref, a_ref):
        if not cfg.triton_like:  # Mosaic: the whole tile by masked doubling (the MXU is big)
            mask = cm.causal_same_doc(dcol_ref[...], drow_ref[...])
            transform, _, _ = cm.wy_transform(
                k_ref[...], beta_ref[...], gcol_ref[...], grow_ref[...], mask, numerics)
            a_ref[...] = transform.astype(a_ref.dtype)
            return

        def lower_block(i, j):  # L_ij from the refs' 16-row slices
            rows, cols = pl.ds(i * size, size), pl.ds(j * size, size)
            mask = dcol_ref[rows, :] == drow_ref[:, cols]
            lower, _, _ = cm.wy_lower(k_ref[rows, :], k_ref[cols, :], beta_ref[rows, :],
                                      gcol_ref[rows, :], grow_ref[:, cols], mask, numerics,
                                      strict=i == j)
            return lower

        count = cfg.chunk // size
        blocks = cm.unit_lower_inverse_from_blocks(lower_block, count, numerics)
        for i in range(count):
            for j in range(count):
                block = blocks[i, j] if j <= i else jnp.zeros((size, size), F32)
                a_ref[pl.ds(i * size, size), pl.ds(j * size, size)] = block.astype(a_ref.dtype)

    shape = jax.ShapeDtypeStruct(cfg.heads_shape(batch, value_heads, length, cfg.chunk),
                                 cfg.compute_dtype)
    return _chunk_parallel(
        cfg, "inverse", kernel, beta.shape, (k, gamma_col, gamma_row, docs_col, docs_row, beta_col),
        [_tile(cfg, dk, key=True), _col(cfg), _row(cfg), _docs_col(cfg), _docs_row(cfg), _col(cfg)],
        [(_tile(cfg, cfg.chunk), shape)],
    )[0]


def prepare(cfg, transform, k, v, beta, start):
    """U = A (beta V), W = A (beta start K) for every chunk: per-head [.., dv], [.., dk]."""
    dk, dv = k.shape[-1], v.shape[-1]
    beta_col, _ = _per_token_views(cfg, beta)
    start_col, _ = _per_token_views(cfg, start)
    batch, value_heads, length = beta.shape

    def kernel(a_ref, k_ref, v_ref, start_ref, beta_ref, u_ref, w_ref):
        u, w = cm.prepare(k_ref[...], v_ref[...], beta_ref[...], start_ref[...], a_ref[...],
                          cfg.numerics)
        u_ref[...] = u.astype(u_ref.dtype)
        w_ref[...] = w.astype(w_ref.dtype)

    per_head = lambda d: jax.ShapeDtypeStruct(  # noqa: E731
        cfg.heads_shape(batch, value_heads, length, d), cfg.compute_dtype)
    return _chunk_parallel(
        cfg, "prepare", kernel, beta.shape, (transform, k, v, start_col, beta_col),
        [_tile(cfg, cfg.chunk), _tile(cfg, dk, key=True), _tile(cfg, dv), _col(cfg), _col(cfg)],
        [(_tile(cfg, dv), per_head(dv)), (_tile(cfg, dk), per_head(dk))],
    )


def output(cfg, q, k, states, v_new, gamma, start, docs, out_dtype):
    """O = (start Q) S0 + ((Q K^T) * decay) V_new for every chunk: per-head [.., dv]."""
    dk, dv = q.shape[-1], v_new.shape[-1]
    batch, value_heads, length = gamma.shape
    gamma_col, gamma_row = _per_token_views(cfg, gamma)
    start_col, _ = _per_token_views(cfg, start)
    docs_col, docs_row = _docs_views(cfg, docs)

    def kernel(q_ref, k_ref, s_ref, vn_ref, grow_ref, dcol_ref, drow_ref, start_ref, gcol_ref,
               o_ref):
        q_tile = q_ref[...]
        mask = cm.causal_same_doc(dcol_ref[...], drow_ref[...])
        scores = cm.matmul(q_tile, k_ref[...], cfg.numerics, transpose_b=True) * cm.decay_matrix(
            gcol_ref[...], grow_ref[...], mask)
        out = cm.output(q_tile, s_ref[...], vn_ref[...], start_ref[...], scores, cfg.numerics)
        o_ref[...] = out.astype(o_ref.dtype)

    shape = jax.ShapeDtypeStruct(cfg.heads_shape(batch, value_heads, length, dv), out_dtype)
    return _chunk_parallel(
        cfg, "output", kernel, gamma.shape,
        (q, k, states, v_new, gamma_row, docs_col, docs_row, start_col, gamma_col),
        [_tile(cfg, dk, key=True), _tile(cfg, dk, key=True), _state(dk, dv), _tile(cfg, dv),
         _row(cfg), _docs_col(cfg), _docs_row(cfg), _col(cfg), _col(cfg)],
        [(_tile(cfg, dv), shape)],
    )[0]


def state_pass(cfg, u, w, k, start, end, initial_state):
    """The sequential pass: (V_new per-head [.., dv], states [B, Hv, N, dk, dv], final fp32)."""
    batch, value_heads, length = start.shape
    dk, dv = w.shape[-1], u.shape[-1]
    num_chunks = length // cfg.chunk
    start_col, _ = _per_token_views(cfg, start)
    end_col, _ = _per_token_views(cfg, end)
    out_shape = [
        jax.ShapeDtypeStruct(u.shape, cfg.compute_dtype),
        jax.ShapeDtypeStruct((batch, value_heads, num_chunks, dk, dv), cfg.compute_dtype),
        jax.ShapeDtypeStruct((batch, value_heads, dk, dv), F32),
    ]
    step = functools.partial(cm.state_step, numerics=cfg.numerics)
    C = cfg.chunk
    if cfg.driver == "grid":

        def kernel(u_ref, w_ref, k_ref, start_ref, end_ref, s0_ref, vn_ref, states_ref, final_ref):
            @pl.when(pl.program_id(2) == 0)
            def _():
                final_ref[...] = s0_ref[...]

            state = final_ref[...]
            states_ref[...] = state.astype(states_ref.dtype)
            v_new, state = step(
                state, u_ref[...], w_ref[...], k_ref[...], start_ref[...], end_ref[...]
            )
            vn_ref[...] = v_new.astype(vn_ref.dtype)
            final_ref[...] = state

        whole_state = pl.BlockSpec((None, None, dk, dv), lambda b, h, n: (b, h, 0, 0))
        return cfg.call(
            kernel, name="state_pass",
            grid=(batch, value_heads, num_chunks),
            in_specs=[_tile(cfg, dv), _tile(cfg, dk), _tile(cfg, dk, key=True), _col(cfg),
                      _col(cfg), whole_state],
            out_specs=[_tile(cfg, dv), _state(dk, dv), whole_state],
            out_shape=out_shape,
            semantics=SEQUENTIAL_LAST,
        )(u, w, k, start_col, end_col, initial_state)

    block = min(cfg.value_block, dv)

    def kernel(u_ref, w_ref, k_ref, start_ref, end_ref, s0_ref, vn_ref, states_ref, final_ref):
        def body(n, state):
            rows = pl.ds(pl.multiple_of(n * C, C), C)
            states_ref[n] = state.astype(states_ref.dtype)
            v_new, state = step(state, u_ref[rows, :], w_ref[rows, :], k_ref[rows, :],
                                start_ref[n], end_ref[n])
            vn_ref[rows, :] = v_new.astype(vn_ref.dtype)
            return state

        final_ref[...] = jax.lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(F32))

    col = pl.BlockSpec((None, None, num_chunks, C, 1), lambda b, h, j: (b, h, 0, 0, 0))
    state_tile = pl.BlockSpec((None, None, dk, block), lambda b, h, j: (b, h, 0, j))
    return cfg.call(
        kernel, name="state_pass",
        grid=(batch, value_heads, dv // block),
        in_specs=[_whole(cfg, length, block, blocked=True), _whole(cfg, length, dk),
                  _whole(cfg, length, dk, key=True), col, col, state_tile],
        out_specs=[_whole(cfg, length, block, blocked=True),
                   pl.BlockSpec((None, None, num_chunks, dk, block), lambda b, h, j: (b, h, 0, 0, j)),
                   state_tile],
        out_shape=out_shape,
        semantics=None,
    )(u, w, k, start_col, end_col, initial_state)


# ----------------------------------------------------------------------------- backward


def local_dv(cfg, q, k, d_out, gamma, docs):
    """((K Q^T) * decay^T) dO for every chunk: the intra-chunk part of dV_new, fp32."""
    dk, dv = q.shape[-1], d_out.shape[-1]
    batch, value_heads, length = gamma.shape
    gamma_col, gamma_row = _per_token_views(cfg, gamma)
    docs_col, docs_row = _docs_views(cfg, docs)

    def kernel(q_ref, k_ref, do_ref, grow_ref, dcol_ref, drow_ref, gcol_ref, out_ref):
        out_ref[...] = cm.local_dv(q_ref[...], k_ref[...], do_ref[...], gcol_ref[...],
                                   grow_ref[...], dcol_ref[...], drow_ref[...], cfg.numerics)

    shape = jax.ShapeDtypeStruct(cfg.heads_shape(batch, value_heads, length, dv), F32)
    return _chunk_parallel(
        cfg, "local_dv", kernel, gamma.shape, (q, k, d_out, gamma_row, docs_col, docs_row, gamma_col),
        [_tile(cfg, dk, key=True), _tile(cfg, dk, key=True), _tile(cfg, dv), _row(cfg),
         _docs_col(cfg), _docs_row(cfg), _col(cfg)],
        [(_tile(cfg, dv), shape)],
    )[0]


def state_pass_backward(cfg, d_final, d_out, d_v_local, w, q, k, start, end):
    """The reverse pass: (dV_new per-head [.., dv] fp32, dS_end per chunk [B, Hv, N, dk, dv],
    d initial state fp32). dS_end of chunk n is the gradient of the state after chunk n."""
    batch, value_heads, length = start.shape
    dk, dv = w.shape[-1], d_out.shape[-1]
    num_chunks = length // cfg.chunk
    start_col, _ = _per_token_views(cfg, start)
    end_col, _ = _per_token_views(cfg, end)
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
            in_specs=[reverse(_tile(cfg, dv)), reverse(_tile(cfg, dv)), reverse(_tile(cfg, dk)),
                      reverse(_tile(cfg, dk, key=True)), reverse(_tile(cfg, dk, key=True)),
                      reverse(_col(cfg)), reverse(_col(cfg)), whole_state],
            out_specs=[reverse(_tile(cfg, dv)), reverse(_state(dk, dv)), whole_state],
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
    values = _whole(cfg, length, block, blocked=True)
    return cfg.call(
        kernel, name="state_pass_backward",
        grid=(batch, value_heads, dv // block),
        in_specs=[values, values, _whole(cfg, length, dk), _whole(cfg, length, dk, key=True),
                  _whole(cfg, length, dk, key=True), col, col, state_tile],
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
    gamma_col, gamma_row = _per_token_views(cfg, gamma)
    start_col, _ = _per_token_views(cfg, start)
    end_col, _ = _per_token_views(cfg, end)
    docs_col, docs_row = _docs_views(cfg, docs)

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
    col_shape = jax.ShapeDtypeStruct(gamma_col.shape, F32)
    row_shape = jax.ShapeDtypeStruct(gamma_row.shape, F32)
    return _chunk_parallel(
        cfg, "output_backward", kernel, gamma.shape,
        (q, k, u, w, states, d_states_end, d_out, gamma_row, docs_col, docs_row, start_col,
         end_col, gamma_col),
        [_tile(cfg, dk, key=True), _tile(cfg, dk, key=True), _tile(cfg, dv), _tile(cfg, dk),
         _state(dk, dv), _state(dk, dv), _tile(cfg, dv), _row(cfg), _docs_col(cfg),
         _docs_row(cfg), _col(cfg), _col(cfg), _col(cfg)],
        [(_tile(cfg, dk), per_head), (_tile(cfg, dk), per_head), (_col(cfg), col_shape),
         (_col(cfg), col_shape), (_col(cfg), col_shape), (_row(cfg), row_shape)],
    )


def wy_backward(cfg, transform, k, v, beta, gamma, start, docs, states, d_v_new):
    """Gradients through U = A (beta V), W = A (beta start K), A = (I + L)^-1: dk per value
    head [.., dk] fp32, dv [.., dv] fp32, and per token [B, Hv, T] fp32 d_beta, d_start,
    d_gamma."""
    dk, dv = k.shape[-1], v.shape[-1]
    batch, value_heads, length = gamma.shape
    beta_col, beta_row = _per_token_views(cfg, beta)
    gamma_col, gamma_row = _per_token_views(cfg, gamma)
    start_col, _ = _per_token_views(cfg, start)
    docs_col, docs_row = _docs_views(cfg, docs)

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
    col_shape = jax.ShapeDtypeStruct(gamma_col.shape, F32)
    row_shape = jax.ShapeDtypeStruct(gamma_row.shape, F32)
    return _chunk_parallel(
        cfg, "wy_backward", kernel, gamma.shape,
        (transform, k, v, states, d_v_new, beta_row, gamma_row, docs_col, docs_row, start_col,
         gamma_col, beta_col),
        [_tile(cfg, cfg.chunk), _tile(cfg, dk, key=True), _tile(cfg, dv), _state(dk, dv),
         _tile(cfg, dv), _row(cfg), _row(cfg), _docs_col(cfg), _docs_row(cfg), _col(cfg),
         _col(cfg), _col(cfg)],
        [(_tile(cfg, dk), per_head(dk)), (_tile(cfg, dv), per_head(dv)), (_col(cfg), col_shape),
         (_col(cfg), col_shape), (_col(cfg), col_shape), (_row(cfg), row_shape)],
    )
