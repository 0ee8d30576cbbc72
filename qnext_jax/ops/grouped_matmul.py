"""Grouped matmul for the MoE experts: rows sorted by group, each group times its own matrix.

Per platform (`impl="auto"`), the grouped GEMM that does not expand into dense products:
  TPU  `megablox`: JAX's Pallas megablox GMM (Mosaic; its own VJP: gmm for the rows' gradient,
       tgmm for the weights'). `jax.lax.ragged_dot` also lowers to XLA:TPU's ragged-dot
       instruction; megablox is what TPU MoE stacks run and is tested here in interpret mode.
  GPU  `tokamax`: tokamax's ragged dot (Mosaic GPU on Hopper, else Triton). XLA:GPU rewrites
       `ragged_dot` to cuDNN where cuDNN takes the shape and otherwise expands it into
       zero-padded dense products (a G-fold waste: openxla/xla#46127), and JAX's switch to a
       Pallas Triton lowering (`jax_ragged_dot_use_gpu_pallas_triton_lowering`) imports a
       module no released wheel ships (jax-ml/jax#40888). On a GPU, tokamax missing or
       refusing the device is an error naming the fix (installing it, or choosing `ragged`
       knowingly: model.grouped_matmul); a silent dense fallback would run out of memory at the
       recipe's scale (118 GiB for configs/gpu_1b.yaml on an 80 GB H100). The same holds when a
       CPU machine compiles for a GPU (`python -m qnext_jax.plan`): tokamax checks the default
       device when it traces, so the planner traces with the compile-only GPU as the default
       device, and a trace for `cuda` that tokamax still refuses is the same error.
       Mosaic GPU (Hopper's WGMMA) takes K and N in whole 128-element tiles: narrower
       products (test-sized models) are zero-padded to them.
  CPU  `tiled`: XLA:CPU lowers `ragged_dot` densely — every row times every group's matrix,
       then a select (measured: temporaries 2x rows x groups x out) — so each group's rows
       are padded to whole tiles of `tile` rows, every tile belongs to one group, and one
       batched matmul multiplies each tile by its group's matrix. Work is the real rows plus at
       most `tile - 1` padding rows per group.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from qnext_jax.config import ConfigError
from qnext_jax.ops.platform import let_tokamax_read_its_flags, running_on, target_platform

IMPLEMENTATIONS = ("auto", "tiled", "ragged", "megablox", "tokamax")


class GroupedMatmulUnavailable(ConfigError):
    """The platform's grouped GEMM cannot run here; the message names the fix."""
log = logging.getLogger(__name__)
_reported: set[str] = set()


def grouped_matmul(rows, weights, group_sizes, *, impl: str = "auto", tile: int = 64,
                   interpret: bool | None = None, zero_past_rows: bool = True):
    """rows [R, K] sorted by group; weights [G, K, F]; group_sizes [G] (sum <= R; rows past the
    sum are not computed and come back as zeros). Returns [R, F] in rows' dtype.
    interpret: run the megablox kernel in Pallas' interpret mode (default: on CPU).
    zero_past_rows=False: the rows past the sum, in the output and in the rows' gradient, are
        left as the kernel leaves them (unwritten memory on GPU and TPU): for a caller that
        masks them once for several products (grouped_swiglu), since every mask here is a
        copy of [R, K] or [R, F] in the forward and again in the backward."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"grouped matmul impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        impl = {"cpu": "tiled", "tpu": "megablox", "gpu": "tokamax"}[target_platform()]
    if impl == "tokamax":
        try:
            return _masked(_tokamax_ragged_dot, rows, weights, group_sizes, zero_past_rows)
        except Exception as error:
            reasons = _tokamax_unavailable(error)
            if reasons is None:
                raise
            if target_platform() == "gpu":
                raise GroupedMatmulUnavailable(
                    f"the MoE experts' grouped matmul needs tokamax on a GPU, which "
                    f"{'is not installed' if isinstance(error, ImportError) else 'refused'} "
                    f"({reasons}). Install it with `pip install 'qnext_jax[cuda]'` (tokamax "
                    f">= 0.0.12), or set model.grouped_matmul=ragged to run XLA's ragged_dot, "
                    f"which XLA:GPU expands into dense products over all {weights.shape[0]} "
                    f"experts ({weights.shape[0]}x the work and memory)"
                    + ("" if running_on("gpu") else
                       "; to compile for a GPU from this machine, trace with a compile-only GPU "
                       "as the default device, as `python -m qnext_jax.plan` does")) from error
            _report(f"grouped matmul: XLA's ragged_dot instead of tokamax (not on a GPU): "
                    f"{reasons}")
            impl = "ragged"
    if impl == "megablox":
        if interpret is None:
            interpret = target_platform() == "cpu"
        return _masked(lambda *a: _megablox_gmm(*a, interpret=interpret), rows, weights,
                       group_sizes, zero_past_rows)
    if impl == "ragged":
        return jax.lax.ragged_dot(rows, weights, group_sizes)
    return tiled_grouped_matmul(rows, weights, group_sizes, tile)


def _report(message):
    if message not in _reported:
        _reported.add(message)
        log.warning(message)


def _tokamax_unavailable(error):
    """Why tokamax cannot run here ("not installed", or its kernels' own refusals: each
    implementation raises NotImplementedError off a GPU, gathered in an ExceptionGroup), or
    None when the error is a real failure."""
    errors = list(error.exceptions) if isinstance(error, ExceptionGroup) else [error]
    if all(isinstance(e, (ImportError, NotImplementedError)) for e in errors):
        return "; ".join(sorted({str(e) for e in errors}))
    return None


def _masked(kernel, rows, weights, group_sizes, zero_past_rows):
    """The kernel's product with the rows past the last group zeroed on the way in and out:
    kernels leave those output rows (and the rows' gradient there) unwritten. `where`'s
    gradient selects, so unwritten values never reach a real row."""
    if not zero_past_rows:
        return kernel(rows, weights, group_sizes.astype(jnp.int32)).astype(rows.dtype)
    valid = (jnp.arange(rows.shape[0]) < jnp.sum(group_sizes))[:, None]
    out = kernel(jnp.where(valid, rows, 0), weights, group_sizes.astype(jnp.int32))
    return jnp.where(valid, out, 0).astype(rows.dtype)


def _tokamax_ragged_dot(rows, weights, group_sizes):
    import tokamax

    let_tokamax_read_its_flags()

    # Mosaic GPU's kernels (and its backward's products, where K and N trade places) tile K
    # and N by 128 and fail while lowering, past tokamax's own fallback, when a dimension is
    # narrower: pad them with zeros (no-ops for real models, whose widths are multiples).
    # Its row tiles need a multiple of 8 rows (a decode step routes 10 rows for one token):
    # the padding rows lie past the last group, where the kernel computes nothing.
    m, k, f = rows.shape[0], rows.shape[1], weights.shape[2]
    pad_m, pad_k, pad_f = -m % MOSAIC_ROWS, -k % MOSAIC_TILE, -f % MOSAIC_TILE
    if pad_m or pad_k:
        rows = jnp.pad(rows, ((0, pad_m), (0, pad_k)))
    if pad_k or pad_f:
        weights = jnp.pad(weights, ((0, 0), (0, pad_k), (0, pad_f)))
    try:
        out = tokamax.ragged_dot(rows, weights, group_sizes, implementation=("mosaic", "triton"))
    except ValueError as error:
        # tokamax >= 0.0.17 offers Triton only with jax_triton installed, and says so by
        # rejecting the name; Mosaic GPU (Ampere, Hopper, Blackwell) is then the one kernel.
        if "Unknown implementation: triton" not in str(error):
            raise
        out = tokamax.ragged_dot(rows, weights, group_sizes, implementation=("mosaic",))
    return out[:m, :f]


MOSAIC_TILE = 128
MOSAIC_ROWS = 8


def _megablox_gmm(rows, weights, group_sizes, *, interpret):
    """megablox.gmm needs the rows in whole tiles of tm (a multiple of 8) and tiles of K and F
    of 128 or less (whole dims when smaller)."""
    from jax.experimental.pallas.ops.tpu import megablox

    num_rows = rows.shape[0]
    tm = min(128, -(-num_rows // 8) * 8)
    padded = -(-num_rows // tm) * tm
    if padded != num_rows:
        rows = jnp.pad(rows, ((0, padded - num_rows), (0, 0)))
    out = megablox.gmm(rows, weights.astype(rows.dtype), group_sizes,
                       preferred_element_type=rows.dtype, tiling=_megablox_tiling,
                       interpret=interpret)
    return out[:num_rows]


def _megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """Tiles for each product megablox runs, the backward's included: there K and N trade
    places, and Mosaic takes a tile narrower than 128 only when it spans the whole dimension."""
    return min(128, m), min(128, k), min(128, n)


def tiled_grouped_matmul(rows, weights, group_sizes, tile: int = 64):
    num_rows, num_groups = rows.shape[0], weights.shape[0]
    group_sizes = group_sizes.astype(jnp.int32)
    if num_rows <= tile:
        return gathered_grouped_matmul(rows, weights, group_sizes)
    padded_sizes = -(-group_sizes // tile) * tile
    ends, padded_ends = jnp.cumsum(group_sizes), jnp.cumsum(padded_sizes)
    starts, padded_starts = ends - group_sizes, padded_ends - padded_sizes
    num_tiles = -(-(num_rows + num_groups * (tile - 1)) // tile)  # static worst case

    index = jnp.arange(num_rows)
    row_group = jnp.searchsorted(ends, index, side="right")  # == num_groups past the last group
    in_group = row_group < num_groups
    group = jnp.minimum(row_group, num_groups - 1)
    # Each row's slot in the tiled layout; rows past the last group go nowhere (dropped).
    slot = jnp.where(in_group, padded_starts[group] + index - starts[group], num_tiles * tile)
    tiles = jnp.zeros((num_tiles * tile, rows.shape[1]), rows.dtype).at[slot].set(rows, mode="drop")
    tile_group = jnp.searchsorted(padded_ends, jnp.arange(num_tiles) * tile, side="right")
    tile_weights = weights[jnp.minimum(tile_group, num_groups - 1)]  # [tiles, K, F]
    out = jnp.einsum("TMK,TKF->TMF", tiles.reshape(num_tiles, tile, -1), tile_weights)
    out = out.reshape(num_tiles * tile, -1)
    return out.at[slot].get(mode="fill", fill_value=0)


def gathered_grouped_matmul(rows, weights, group_sizes):
    """Few rows (decoding: a few tokens times top-k): each row multiplied by its own group's
    matrix, gathered. The tiled layout would pad every group to a whole tile (for one token
    and 32 experts, 2,048 rows of work for 4) and read every group's weights."""
    num_rows, num_groups = rows.shape[0], weights.shape[0]
    ends = jnp.cumsum(group_sizes)
    row_group = jnp.searchsorted(ends, jnp.arange(num_rows), side="right")
    mine = weights[jnp.minimum(row_group, num_groups - 1)]  # [rows, K, F]
    out = jnp.einsum("RK,RKF->RF", rows, mine)
    return jnp.where((row_group < num_groups)[:, None], out, 0).astype(rows.dtype)
