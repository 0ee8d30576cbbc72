"""Numerics with several implementations behind one function each."""

from qnext_jax.ops.causal_conv import causal_depthwise_conv
from qnext_jax.ops.gated_delta_rule import gated_delta_rule, l2_normalize

__all__ = ["causal_depthwise_conv", "gated_delta_rule", "l2_normalize"]
