"""Several projections of one input as one matmul.

A layer reads the same activations through several kernels (DeltaNet: q, k, v, z, b, a;
attention: q, gate, k, v; SwiGLU: gate, up). As separate matmuls the backward adds their input
gradients one by one, and XLA:CPU lays some of those sums out transposed: a copy per projection
that costs more than the matmul. One matmul against the kernels side by side has one input
gradient and one weight gradient, and narrow kernels (the DeltaNet's b and a, one column per
head) ride along at full matmul speed.

Only where no device holds a part of a kernel's output axes: with the heads split over
`tensor`, the side-by-side kernel would not split into whole heads per device, so there each
kernel keeps its own matmul.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qnext_jax.parallel.mesh import axis_size


def outputs_unsplit() -> bool:
    """True without a mesh, or on one whose `tensor` axis (heads, MLP widths) has one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or axis_size(mesh, "tensor") == 1


def project_together(x: jnp.ndarray, kernels) -> list[jnp.ndarray]:
    """x [..., E]; kernels [E, *out_i], all in x's dtype -> [x @ kernel_i, shaped [..., *out_i]]."""
    if len(kernels) == 1 or not outputs_unsplit():
        return [jnp.tensordot(x, kernel, axes=1) for kernel in kernels]
    widths = [math.prod(kernel.shape[1:]) for kernel in kernels]
    side_by_side = jnp.concatenate([kernel.reshape(kernel.shape[0], -1) for kernel in kernels], 1)
    pieces = jnp.split(x @ side_by_side, np.cumsum(widths)[:-1].tolist(), axis=-1)
    return [piece.reshape(*x.shape[:-1], *kernel.shape[1:])
            for piece, kernel in zip(pieces, kernels)]
