"""Causal depthwise 1-D convolution (the Gated DeltaNet short conv), document-aware."""

import jax
import jax.numpy as jnp

from qnext_jax.ops.segments import document_index


def causal_depthwise_conv(
    x: jnp.ndarray, kernel: jnp.ndarray, *, segment_ids: jnp.ndarray | None = None
) -> jnp.ndarray:
    """y[t] = sum_j kernel[j] * x[t - (K-1) + j], with x before the row start (or before the
    token's document start) taken as zero. `kernel[K-1]` multiplies the current token, as in
    PyTorch's cross-correlation.

    x: [B, T, *channels]; kernel: [K, *channels]; returns [B, T, *channels] (no activation).
    Written as K shifted multiply-adds rather than a conv op: K is 4, the channel layout stays
    whatever the caller shards by (heads), and the document mask is one comparison per shift.
    """
    width = kernel.shape[0]
    batch, length = x.shape[:2]
    channel_axes = (1,) * (x.ndim - 2)
    docs = None if segment_ids is None else document_index(segment_ids)
    out = x * kernel[width - 1]
    for shift in range(1, width):
        if shift >= length:
            break
        shifted = jnp.pad(x[:, : length - shift], [(0, 0), (shift, 0)] + [(0, 0)] * (x.ndim - 2))
        if docs is not None:
            same_doc = jnp.pad(docs[:, shift:] == docs[:, : length - shift], [(0, 0), (shift, 0)])
            shifted = shifted * same_doc.reshape(batch, length, *channel_axes).astype(x.dtype)
        out = out + shifted * kernel[width - 1 - shift]
    return out


def causal_conv_silu(x, kernel, *, segment_ids=None):
    """The short conv as the DeltaNet uses it: convolution then SiLU."""
    return jax.nn.silu(causal_depthwise_conv(x, kernel, segment_ids=segment_ids))
