"""The 80B's fused LM head + loss alone, compiled by the real compilers: the main head and one MTP
depth sharing the weight (E 2048, V 151,936, bf16), forward + backward, 4,096 tokens a device,
the weight's width over fsdp 8 — the memory the vocabulary blocks save, op by op.

    python benchmarks/head_memory.py h100x8 v5p-16
    PYTHONPATH=<a checkout of an older commit> python benchmarks/head_memory.py h100x8 v5p-16
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from qnext_jax.ops.linear_cross_entropy import HeadSharding, linear_cross_entropy  # noqa: E402
from qnext_jax.plan.compiler import compile_jitted, target_devices  # noqa: E402
from qnext_jax.plan.targets import get_target  # noqa: E402

WIDTH, VOCAB, TOKENS, DEVICES = 2048, 151936, 4096, 8


def compile_head(name: str) -> dict:
    target = get_target(name)
    devices = target_devices(target)[:DEVICES]
    mesh = jax.sharding.Mesh(np.array(devices), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = HeadSharding(rows="fsdp", positions=None, vocab=None, width="fsdp")

    def loss(hidden, mtp_hidden, weight, targets):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return sum(jnp.sum(linear_cross_entropy(h, weight, targets, vocab_major=False,
                                                    sharding=sharding))
                       for h in (hidden, mtp_hidden))

    placed = lambda shape, dtype, spec: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=NamedSharding(mesh, spec))
    hidden = placed((DEVICES, TOKENS, WIDTH), jnp.bfloat16, P("fsdp", None, None))
    args = (hidden, hidden, placed((WIDTH, VOCAB), jnp.bfloat16, P("fsdp", None)),
            placed((DEVICES, TOKENS), jnp.int32, P("fsdp", None)))
    compiled = compile_jitted(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), args, target, devices[0])
    return {"temporaries_gib": compiled.temporaries / 2**30, "peak_gib": compiled.peak / 2**30}


if __name__ == "__main__":
    for target_name in sys.argv[1:] or ["h100x8", "v5p-16"]:
        result = compile_head(target_name)
        print(f"{target_name}: temporaries {result['temporaries_gib']:.2f} GiB, "
              f"peak {result['peak_gib']:.2f} GiB", flush=True)
