"""The per-chunk algebra of the chunked gated delta rule, on values already loaded into a kernel.

Every function takes tiles of one chunk of C tokens and one value head — 2-D inside a kernel,
or with leading batch axes in the XLA driver (matmuls and sums act on the last two axes) — and
uses only what lowers on all three Pallas targets (Mosaic TPU, Triton, interpret): matmuls,
broadcasts of [C, 1] columns and [1, C] rows, iota masks, exp, lane/sublane sums. No slicing of
values, no transposes of vectors, no LAPACK (`unit_lower_inverse_blocked` slices and is
XLA-only). Per-token vectors therefore arrive in the orientation they are
used in: `_col` tiles are [C, 1] (one value per row), `_row` tiles are [1, C].

The chunk quantities (spec section 2.4, WY form), for in-chunk cumulative log-decay gamma,
`start` = e^gamma on tokens still in the document the chunk started in (0 elsewhere), `end` =
e^(gamma_last - gamma) on tokens in the chunk's last document (0 elsewhere):

    decay[r, s] = e^(gamma_r - gamma_s)  for s <= r in the same document, else 0
    L           = strictly-lower part of beta_r (K K^T)[r, s] decay[r, s],   A = (I + L)^-1
    U = A (beta V),   W = A (beta start K)
    V_new = U - W S0,   O = (start Q) S0 + ((Q K^T) * decay) V_new
    S_end = start_last S0 + (end K)^T V_new          (start_last = e^gamma_last if S0 survives)
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How the chunk algebra multiplies.

    compute_dtype: the operand dtype of every product (bf16 operands with fp32 accumulation for
        bf16 training; fp32 when fp32 exactness is asked).
    fp32_precision: the precision of products with fp32 operands (fp32 compute, and the
        forward's (I + L)^-1 arithmetic, fp32 in every mode; in bf16 mode A is stored in bf16
        and its gradient, dL = -A^T dA A^T, takes bf16 operands, as FLA's).
    inverse: which (I + L)^-1 (masked full-tile doubling in Mosaic kernels, sliced blocks in
        XLA; the Triton kernels invert 16 x 16 blocks read from refs, see kernels.inverse).
    transpose_by_dot: compute a transposed product (K Q^T, dA^T) as its own dot rather than
        transposing a dot result that feeds another dot: on Hopper that pattern is behind
        known Triton miscompiles (flash-linear-attention #640, triton #6124).
    """

    compute_dtype: Any
    fp32_precision: Any = jax.lax.Precision.HIGHEST
    inverse: Callable | None = None
    transpose_by_dot: bool = False

    def invert(self, lower):
        return (self.inverse or unit_lower_inverse)(lower, self)


def matmul(a, b, numerics, transpose_a=False, transpose_b=False, exact=False):
    """a @ b over the last two axes (leading axes broadcast), fp32 accumulation.

    Operands are cast to numerics.compute_dtype unless `exact`, which keeps fp32 operands.
    """
    dtype = F32 if exact else numerics.compute_dtype
    precision = numerics.fp32_precision if dtype == F32 else jax.lax.Precision.DEFAULT
    spec = ("...ji" if transpose_a else "...ij") + "," + ("...kj" if transpose_b else "...jk")
    return jnp.einsum(
        spec + "->...ik", a.astype(dtype), b.astype(dtype),
        precision=precision, preferred_element_type=F32,
    )


L2_EPS = 1e-6  # inside the sum, as FLA and transformers


def l2_normalize(x, scale=1.0):
    """scale * x / sqrt(sum(x^2) + eps) over the last axis, in fp32."""
    x = x.astype(F32)
    return x * (jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS) * scale)


def iotas(size):
    rows = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
    return rows, cols


def causal_same_doc(docs_col, docs_row):
    """[C, C] bool: s <= r and tokens r, s in the same document."""
    rows, cols = iotas(docs_col.shape[-2])
    return (rows >= cols) & (docs_col == docs_row)


def decay_matrix(gamma_col, gamma_row, mask):
    """e^(gamma_r - gamma_s) where `mask`, else 0. Inside a document gamma only falls (g <= 0),
    so the exponent is clamped at 0 only to keep the masked-out half finite."""
    return jnp.where(mask, jnp.exp(jnp.minimum(gamma_col - gamma_row, 0.0)), 0.0)


def causal_same_doc_transposed(docs_col, docs_row):
    """causal_same_doc(...)^T: r <= s and tokens r, s in the same document."""
    rows, cols = iotas(docs_col.shape[-2])
    return (rows <= cols) & (docs_col == docs_row)


def decay_matrix_transposed(gamma_col, gamma_row, mask_t):
    """decay_matrix(...)^T from the same vectors (no transpose of a value): [s, r] =
    e^(gamma_r - gamma_s) where mask_t = causal_same_doc_transposed(...)."""
    return jnp.where(mask_t, jnp.exp(jnp.minimum(gamma_row - gamma_col, 0.0)), 0.0)


def last_row_mask(col):
    return jax.lax.broadcasted_iota(jnp.int32, col.shape, col.ndim - 2) == col.shape[-2] - 1


def last_row_value(col):
    """The value of a [C, 1] column at its last row, as a [1, 1] tile (no value slicing)."""
    return jnp.sum(jnp.where(last_row_mask(col), col, 0.0), axis=-2, keepdims=True)


def unit_lower_inverse(lower, numerics):
    """(I + L)^-1 for strictly lower-triangular fp32 L [C, C], C a power of two.

    Block recursion with masks instead of slices: if D_b is the block-diagonal matrix of the
    inverses of the b x b diagonal blocks, the inverse over 2b x 2b blocks is
    D_2b = D_b - D_b (L * M_b) D_b, where M_b keeps the lower-left b x b quarter of every
    2b x 2b diagonal block. Starts from D_1 = I; 2 (log2 C - 1) full-precision C x C matmuls.
    """
    size = lower.shape[-1]
    rows, cols = iotas(size)
    identity = jnp.where(rows == cols, 1.0, 0.0).astype(F32)

    def coupling(block):
        same_pair = jnp.right_shift(rows, block.bit_length()) == jnp.right_shift(cols, block.bit_length())
        quarter = ((rows & block) != 0) & ((cols & block) == 0)
        return jnp.where(same_pair & quarter, lower, 0.0)

    inverse = identity - coupling(1)
    block = 2
    while block < size:
        off_diagonal = matmul(inverse, coupling(block), numerics, exact=True)
        inverse = inverse - matmul(off_diagonal, inverse, numerics, exact=True)
        block *= 2
    return inverse


def unit_lower_inverse_blocked(lower, numerics):
    """The same inverse by sliced blocks, for XLA: inv([[A, 0], [X, D]]) =
    [[A^-1, 0], [-D^-1 X A^-1, D^-1]] from 1 x 1 blocks up, each level one batched matmul pair
    over the blocks alone (about C^3 / 3 multiply-adds in all, against 2 C^3 per level above)."""
    size = lower.shape[-1]
    batch_shape = lower.shape[:-2]
    inverse = jnp.ones(batch_shape + (size, 1, 1), lower.dtype)  # the 1 x 1 diagonal blocks
    block = 1
    while block < size:
        pairs = size // (2 * block)
        inverse = inverse.reshape(batch_shape + (pairs, 2, block, block))
        upper_inv, lower_inv = inverse[..., 0, :, :], inverse[..., 1, :, :]
        paired = lower.reshape(batch_shape + (pairs, 2 * block, pairs, 2 * block))
        paired = jnp.diagonal(paired, axis1=-4, axis2=-2)  # [..., 2b, 2b, pairs]
        coupling = jnp.moveaxis(paired, -1, -3)[..., block:, :block]  # [..., pairs, b, b]
        off = -matmul(matmul(lower_inv, coupling, numerics, exact=True), upper_inv, numerics,
                      exact=True)
        top = jnp.concatenate([upper_inv, jnp.zeros_like(upper_inv)], axis=-1)
        bottom = jnp.concatenate([off, lower_inv], axis=-1)
        inverse = jnp.concatenate([top, bottom], axis=-2)  # [..., pairs, 2b, 2b]
        block *= 2
    return inverse.reshape(batch_shape + (size, size))


INVERSE_BLOCK = 16  # the smallest tensor-core product


def unit_lower_inverse_from_blocks(lower_block, count, numerics):
    """(I + L)^-1 by block forward substitution over `count` x `count` blocks of 16 x 16:

        A_ii = (I + L_ii)^-1 (masked doubling, 3 levels),  A_ij = -A_ii sum_{j<=m<i} L_im A_mj.

    lower_block(i, j) -> L_ij [16, 16] fp32 for j <= i (strictly lower when i == j), computed
    by the caller from slices of its refs, so no value is ever sliced. About C^3 / 6 + C^2 * 16
    multiply-adds for C = 16 count, against 2 C^3 per doubling level of the full tile.
    Returns {(i, j): A_ij} for j <= i (the blocks above the diagonal are zero)."""
    lower = {(i, j): lower_block(i, j) for i in range(count) for j in range(i + 1)}
    inverse = {}
    for i in range(count):
        diagonal = unit_lower_inverse(lower[i, i], numerics)
        inverse[i, i] = diagonal
        for j in range(i):
            coupled = sum(matmul(lower[i, m], inverse[m, j], numerics, exact=True)
                          for m in range(j, i))
            inverse[i, j] = -matmul(diagonal, coupled, numerics, exact=True)
    return inverse


def wy_lower(k_rows, k_cols, beta_col, gamma_col, gamma_row, mask, numerics, strict=True):
    """L = beta_r (K K^T)[r, s] decay[r, s] on `mask`, strictly below the diagonal if `strict`:
    (L, decay, K K^T). For the whole chunk k_rows = k_cols = K; for the block (i, j) of the
    chunk, the keys of row block i and column block j (strict only on the diagonal)."""
    gram = matmul(k_rows, k_cols, numerics, transpose_b=True)
    decay = decay_matrix(gamma_col, gamma_row, mask)
    lower = beta_col * gram * decay
    if strict:
        rows, cols = iotas(lower.shape[-1])
        lower = jnp.where(rows > cols, lower, 0.0)
    return lower, decay, gram


def wy_transform(k, beta_col, gamma_col, gamma_row, mask, numerics):
    """(A, decay, K K^T) of one chunk and value head; A = (I + L)^-1 in fp32."""
    lower, decay, gram = wy_lower(k, k, beta_col, gamma_col, gamma_row, mask, numerics)
    return numerics.invert(lower), decay, gram


def prepare(k, v, beta_col, start_col, transform, numerics):
    """U = A (beta V) and W = A (beta start K): the parts of the chunk that do not need S0."""
    u = matmul(transform, beta_col * v.astype(F32), numerics)
    w = matmul(transform, (beta_col * start_col) * k.astype(F32), numerics)
    return u, w


def state_step(state, u, w, k, start_col, end_col, numerics):
    """One chunk of the sequential pass: (V_new, state after the chunk); state fp32 [dk, dv]."""
    v_new = u.astype(F32) - matmul(w, state, numerics)
    carry = last_row_value(start_col)  # e^gamma_last if S0's document reaches the chunk end
    keys_to_end = end_col * k.astype(F32)
    return v_new, carry * state + matmul(keys_to_end, v_new, numerics, transpose_a=True)


def output(q, state, v_new, start_col, scores, numerics):
    """O = (start Q) S0 + scores V_new, with scores = (Q K^T) * decay."""
    inter = matmul(start_col * q.astype(F32), state, numerics)
    return inter + matmul(scores, v_new, numerics)


def local_dv(q, k, d_out, gamma_col, gamma_row, docs_col, docs_row, numerics):
    """The intra-chunk part of dV_new: scores^T dO = ((K Q^T) * decay^T) dO, with K Q^T its
    own product (not the transpose of Q K^T: see `Numerics.transpose_by_dot`)."""
    if numerics.transpose_by_dot:
        scores_t = matmul(k, q, numerics, transpose_b=True) * decay_matrix_transposed(
            gamma_col, gamma_row, causal_same_doc_transposed(docs_col, docs_row))
        return matmul(scores_t, d_out, numerics)
    mask = causal_same_doc(docs_col, docs_row)
    scores = matmul(q, k, numerics, transpose_b=True) * decay_matrix(gamma_col, gamma_row, mask)
    return matmul(scores, d_out, numerics, transpose_a=True)


def state_step_backward(d_state_end, d_out, d_v_local, w, k, q, start_col, end_col, numerics):
    """Reverse of `state_step` + `output` with respect to V_new and S0.

    Returns (dV_new, dS0): dV_new = scores^T dO + (end K) dS_end (the first term given as
    `d_v_local`), dS0 = (start Q)^T dO + start_last dS_end - W^T dV_new.
    """
    keys_to_end = end_col * k.astype(F32)
    d_v_new = d_v_local + matmul(keys_to_end, d_state_end, numerics)
    carry = last_row_value(start_col)
    d_state = matmul(start_col * q.astype(F32), d_out, numerics, transpose_a=True)
    d_state = d_state + carry * d_state_end - matmul(w, d_v_new, numerics, transpose_a=True)
    return d_v_new, d_state


def _decay_gradients(d_decay):
    """decay[r, s] = e^(gamma_r - gamma_s): (d gamma as the [C, 1] column of the r terms,
    d gamma as the [1, C] row of the s terms)."""
    return jnp.sum(d_decay, axis=-1, keepdims=True), -jnp.sum(d_decay, axis=-2, keepdims=True)


def output_backward(q, k, v_new, state, d_state_end, d_out, start_col, end_col, gamma_col,
                    gamma_row, docs_col, docs_row, numerics, q_keys=None, v_new_t=None):
    """Gradients through O = (start Q) S0 + ((Q K^T) * decay) V_new and through the chunk's
    contribution (end K)^T V_new + start_last S0 to S_end, with V_new held fixed (its own
    gradient came from the reverse state pass).

    Returns dq, dk [C, dk] (this value head's share), the [C, 1] columns d_start (including the
    carry e^gamma_last at the last row) and d_end, and d gamma as a [C, 1] column and a [1, C]
    row. `q_keys` (Q K^T) is recomputed unless given. With `numerics.transpose_by_dot`,
    `v_new_t` = V_new^T must come from its own products (V_new is itself a product).
    """
    qf, kf = q.astype(F32), k.astype(F32)
    decay = decay_matrix(gamma_col, gamma_row, causal_same_doc(docs_col, docs_row))
    if q_keys is None:
        q_keys = matmul(q, k, numerics, transpose_b=True)
    d_queries_start = matmul(d_out, state, numerics, transpose_b=True)  # d(start Q)
    d_keys_end = matmul(v_new, d_state_end, numerics, transpose_b=True)  # d(end K)
    if numerics.transpose_by_dot:
        d_scores = matmul(d_out, v_new_t, numerics) * decay
    else:
        d_scores = matmul(d_out, v_new, numerics, transpose_b=True) * decay
    if numerics.transpose_by_dot:
        d_scores_t = matmul(v_new, d_out, numerics, transpose_b=True) * decay_matrix_transposed(
            gamma_col, gamma_row, causal_same_doc_transposed(docs_col, docs_row))
        dk = matmul(d_scores_t, q, numerics)
    else:
        dk = matmul(d_scores, q, numerics, transpose_a=True)
    dq = start_col * d_queries_start + matmul(d_scores, k, numerics)
    dk = dk + end_col * d_keys_end
    d_carry = jnp.sum(jnp.sum(state * d_state_end, axis=-1, keepdims=True), axis=-2, keepdims=True)
    d_start = jnp.sum(qf * d_queries_start, axis=-1, keepdims=True) + jnp.where(
        last_row_mask(start_col), d_carry, 0.0)
    d_end = jnp.sum(kf * d_keys_end, axis=-1, keepdims=True)
    return (dq, dk, d_start, d_end, *_decay_gradients(d_scores * q_keys))


def wy_backward(k, v, beta_col, beta_row, start_col, gamma_col, gamma_row, docs_col, docs_row,
                transform, state, d_v_new, numerics, gram=None):
    """Gradients through V_new = U - W S0 with U = A (beta V), W = A (beta start K) and
    A = (I + L)^-1, L = strictly lower (beta_r (K K^T) decay), given dV_new.

    Returns dk [C, dk] (this value head's share), dv [C, dv], the [C, 1] columns d_beta and
    d_start, and d gamma as a [C, 1] column and a [1, C] row. `gram` (K K^T) is recomputed
    unless given.
    """
    kf, vf = k.astype(F32), v.astype(F32)
    rows, cols = iotas(k.shape[-2])
    decay = decay_matrix(gamma_col, gamma_row, causal_same_doc(docs_col, docs_row))
    if gram is None:
        gram = matmul(k, k, numerics, transpose_b=True)
    values_in = beta_col * vf
    keys_in = (beta_col * start_col) * kf
    d_w = -matmul(d_v_new, state, numerics, transpose_b=True)
    d_transform = (matmul(d_v_new, values_in, numerics, transpose_b=True)
                   + matmul(d_w, keys_in, numerics, transpose_b=True))
    d_values_in = matmul(transform, d_v_new, numerics, transpose_a=True)
    d_keys_in = matmul(transform, d_w, numerics, transpose_a=True)
    # A = (I + L)^-1  =>  dL = -A^T dA A^T, on the strictly lower triangle.
    d_lower = -matmul(matmul(transform, d_transform, numerics, transpose_a=True), transform,
                      numerics, transpose_b=True)
    d_lower = jnp.where(rows > cols, d_lower, 0.0)
    d_gram = d_lower * beta_col * decay
    if numerics.transpose_by_dot:  # dL^T = -A dA^T A, dA^T from its own products
        d_w_t = -matmul(state, d_v_new, numerics, transpose_b=True)  # not d_w transposed
        d_transform_t = (matmul(values_in, d_v_new, numerics, transpose_b=True)
                         + matmul(keys_in, d_w_t, numerics))
        d_lower_t = -matmul(matmul(transform, d_transform_t, numerics), transform, numerics)
        d_gram_t = jnp.where(rows < cols, d_lower_t, 0.0) * beta_row * decay_matrix_transposed(
            gamma_col, gamma_row, causal_same_doc_transposed(docs_col, docs_row))
        d_keys_from_gram = matmul(d_gram, kf, numerics) + matmul(d_gram_t, kf, numerics)
    else:  # K K^T  =>  dK = (dG + dG^T) K
        d_keys_from_gram = (matmul(d_gram, kf, numerics)
                            + matmul(d_gram, kf, numerics, transpose_a=True))
    dk = (beta_col * start_col) * d_keys_in + d_keys_from_gram
    dv = beta_col * d_values_in
    keys_dot_d_keys_in = jnp.sum(kf * d_keys_in, axis=-1, keepdims=True)
    d_beta = (jnp.sum(vf * d_values_in, axis=-1, keepdims=True)
              + start_col * keys_dot_d_keys_in
              + jnp.sum(d_lower * gram * decay, axis=-1, keepdims=True))
    d_start = beta_col * keys_dot_d_keys_in
    return (dk, dv, d_beta, d_start, *_decay_gradients(d_gram * gram))


def chunk_backward(q, k, v, beta_col, beta_row, start_col, end_col, gamma_col, gamma_row,
                   docs_col, docs_row, state, d_state_end, d_out, d_v_new, v_new, wy, q_keys,
                   numerics):
    """Both halves for one chunk (the XLA driver, which keeps `wy`, Q K^T and V_new from the
    forward). Returns dq, dk, dv, d_beta, d_start, d_end, d_gamma (column, row)."""
    transform, _, gram = wy
    dq, dk_out, d_start_out, d_end, dg_col_out, dg_row_out = output_backward(
        q, k, v_new, state, d_state_end, d_out, start_col, end_col, gamma_col, gamma_row,
        docs_col, docs_row, numerics, q_keys=q_keys)
    dk_wy, dv, d_beta, d_start_wy, dg_col_wy, dg_row_wy = wy_backward(
        k, v, beta_col, beta_row, start_col, gamma_col, gamma_row, docs_col, docs_row, transform,
        state, d_v_new, numerics, gram=gram)
    return (dq, dk_out + dk_wy, dv, d_beta, d_start_out + d_start_wy, d_end,
            dg_col_out + dg_col_wy, dg_row_out + dg_row_wy)
