"""The Pallas calls of the chunked gated delta rule: the kernel config, block specs and the
four forward kernels (the five backward ones: backward_kernels.py).

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


def head_of(cfg, key):
    return (lambda h: jax.lax.div(h, cfg.group)) if key else (lambda h: h)


def tile_spec(cfg, dim, *, key=False):
    """One chunk of one head of a per-head tensor: a [C, dim] block."""
    head = head_of(cfg, key)
    if cfg.native_layout:
        return pl.BlockSpec((None, cfg.chunk, None, dim), lambda b, h, n: (b, n, head(h), 0))
    return pl.BlockSpec((None, None, cfg.chunk, dim), lambda b, h, n: (b, head(h), n, 0))


def col_spec(cfg):
    return pl.BlockSpec((None, None, None, cfg.chunk, 1), lambda b, h, n: (b, h, n, 0, 0))


def row_spec(cfg):
    return pl.BlockSpec((None, None, None, 1, cfg.chunk), lambda b, h, n: (b, h, n, 0, 0))


def state_spec(dk, dv):
    return pl.BlockSpec((None, None, None, dk, dv), lambda b, h, n: (b, h, n, 0, 0))


def docs_col_spec(cfg):
    return pl.BlockSpec((None, None, cfg.chunk, 1), lambda b, h, n: (b, n, 0, 0))


def docs_row_spec(cfg):
    return pl.BlockSpec((None, None, 1, cfg.chunk), lambda b, h, n: (b, n, 0, 0))


# Sequential kernels on the "loop" driver: grid (b, value head, value block), whole length.


def whole_spec(cfg, length, dim, *, key=False, blocked=False):
    head = head_of(cfg, key)
    column = (lambda j: j) if blocked else (lambda j: 0)
    if cfg.native_layout:
        return pl.BlockSpec((None, length, None, dim), lambda b, h, j: (b, 0, head(h), column(j)))
    return pl.BlockSpec((None, None, length, dim), lambda b, h, j: (b, head(h), 0, column(j)))


def per_token_views(cfg, x):
    """[B, Hv, T] -> (col [B, Hv, N, C, 1], row [B, Hv, N, 1, C])."""
    shape = x.shape[:-1] + (x.shape[-1] // cfg.chunk,)
    return x.reshape(shape + (cfg.chunk, 1)), x.reshape(shape + (1, cfg.chunk))


def docs_views(cfg, docs):
    shape = docs.shape[:-1] + (docs.shape[-1] // cfg.chunk,)
    return docs.reshape(shape + (cfg.chunk, 1)), docs.reshape(shape + (1, cfg.chunk))


def chunk_parallel(cfg, name, kernel, per_token_shape, args, in_specs, outputs):
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
    beta_col, _ = per_token_views(cfg, beta)
    gamma_col, gamma_row = per_token_views(cfg, gamma)
    docs_col, docs_row = docs_views(cfg, docs)
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
    return chunk_parallel(
        cfg, "inverse", kernel, beta.shape, (k, gamma_col, gamma_row, docs_col, docs_row, beta_col),
        [tile_spec(cfg, dk, key=True), col_spec(cfg), row_spec(cfg), docs_col_spec(cfg), docs_row_spec(cfg), col_spec(cfg)],
        [(tile_spec(cfg, cfg.chunk), shape)],
    )[0]


def prepare(cfg, transform, k, v, beta, start):
    """U = A (beta V), W = A (beta start K) for every chunk: per-head [.., dv], [.., dk]."""
    dk, dv = k.shape[-1], v.shape[-1]
    beta_col, _ = per_token_views(cfg, beta)
    start_col, _ = per_token_views(cfg, start)
    batch, value_heads, length = beta.shape

    def kernel(a_ref, k_ref, v_ref, start_ref, beta_ref, u_ref, w_ref):
        u, w = cm.prepare(k_ref[...], v_ref[...], beta_ref[...], start_ref[...], a_ref[...],
                          cfg.numerics)
        u_ref[...] = u.astype(u_ref.dtype)
        w_ref[...] = w.astype(w_ref.dtype)

    per_head = lambda d: jax.ShapeDtypeStruct(  # noqa: E731
        cfg.heads_shape(batch, value_heads, length, d), cfg.compute_dtype)
    return chunk_parallel(
        cfg, "prepare", kernel, beta.shape, (transform, k, v, start_col, beta_col),
        [tile_spec(cfg, cfg.chunk), tile_spec(cfg, dk, key=True), tile_spec(cfg, dv), col_spec(cfg), col_spec(cfg)],
        [(tile_spec(cfg, dv), per_head(dv)), (tile_spec(cfg, dk), per_head(dk))],
    )


def output(cfg, q, k, states, v_new, gamma, start, docs, out_dtype):
    """O = (start Q) S0 + ((Q K^T) * decay) V_new for every chunk: per-head [.., dv]."""
    dk, dv = q.shape[-1], v_new.shape[-1]
    batch, value_heads, length = gamma.shape
    gamma_col, gamma_row = per_token_views(cfg, gamma)
    start_col, _ = per_token_views(cfg, start)
    docs_col, docs_row = docs_views(cfg, docs)

    def kernel(q_ref, k_ref, s_ref, vn_ref, grow_ref, dcol_ref, drow_ref, start_ref, gcol_ref,
               o_ref):
        q_tile = q_ref[...]
        mask = cm.causal_same_doc(dcol_ref[...], drow_ref[...])
        scores = cm.matmul(q_tile, k_ref[...], cfg.numerics, transpose_b=True) * cm.decay_matrix(
            gcol_ref[...], grow_ref[...], mask)
        out = cm.output(q_tile, s_ref[...], vn_ref[...], start_ref[...], scores, cfg.numerics)
        o_ref[...] = out.astype(o_ref.dtype)

    shape = jax.ShapeDtypeStruct(cfg.heads_shape(batch, value_heads, length, dv), out_dtype)
    return chunk_parallel(
        cfg, "output", kernel, gamma.shape,
        (q, k, states, v_new, gamma_row, docs_col, docs_row, start_col, gamma_col),
        [tile_spec(cfg, dk, key=True), tile_spec(cfg, dk, key=True), state_spec(dk, dv), tile_spec(cfg, dv),
         row_spec(cfg), docs_col_spec(cfg), docs_row_spec(cfg), col_spec(cfg), col_spec(cfg)],
        [(tile_spec(cfg, dv), shape)],
    )[0]


def state_pass(cfg, u, w, k, start, end, initial_state):
    """The sequential pass: (V_new per-head [.., dv], states [B, Hv, N, dk, dv], final fp32)."""
    batch, value_heads, length = start.shape
    dk, dv = w.shape[-1], u.shape[-1]
    num_chunks = length // cfg.chunk
    start_col, _ = per_token_views(cfg, start)
    end_col, _ = per_token_views(cfg, end)
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
            in_specs=[tile_spec(cfg, dv), tile_spec(cfg, dk), tile_spec(cfg, dk, key=True), col_spec(cfg),
                      col_spec(cfg), whole_state],
            out_specs=[tile_spec(cfg, dv), state_spec(dk, dv), whole_state],
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
        in_specs=[whole_spec(cfg, length, block, blocked=True), whole_spec(cfg, length, dk),
                  whole_spec(cfg, length, dk, key=True), col, col, state_tile],
        out_specs=[whole_spec(cfg, length, block, blocked=True),
                   pl.BlockSpec((None, None, num_chunks, dk, block), lambda b, h, j: (b, h, 0, 0, j)),
                   state_tile],
        out_shape=out_shape,
        semantics=None,
    )(u, w, k, start_col, end_col, initial_state)
