"""The Pallas delta-rule kernels lower for TPU (Mosaic) and GPU (Triton) from this CPU machine.

`jax.export` runs each kernel's lowering for the named platform without the hardware, so a
kernel that uses something Mosaic or Triton cannot express fails here, not on the first pod.
Forward and backward together, at the Qwen3-Next head size (dk = dv = 128), 64-token chunks,
Hv = 2 Hk, packed segments, an initial state, a length that is not a multiple of the chunk.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from qnext_jax.ops import gated_delta_rule

B, T, HK, HV, D = 1, 200, 2, 4, 128
TRITON_CALL = "__gpu$xla.gpu.triton"


def train_step_of_delta_rule(backend):
    def loss(q, k, v, g, beta, state0, segment_ids):
        out, state = gated_delta_rule(
            q, k, v, g, beta, segment_ids=segment_ids, initial_state=state0, impl="pallas",
            pallas_backend=backend, normalize_qk=True, chunk_size=64,
        )
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(state)

    return jax.jit(jax.value_and_grad(loss, argnums=range(6)))


def compile_only_gpu():
    pytest.importorskip("jax_cuda12_plugin", reason="needs XLA:GPU: pip install 'qnext_jax[aot]'")
    from qnext_jax.plan.compiler import target_devices
    from qnext_jax.plan.targets import get_target

    return target_devices(get_target("h100"))[0]


def export_train_step(platform, backend, dtype, value_dim=D):
    """-> (the exported forward + backward, the argument shapes)."""
    shape = jax.ShapeDtypeStruct
    args = (
        shape((B, T, HK, D), dtype), shape((B, T, HK, D), dtype), shape((B, T, HV, value_dim), dtype),
        shape((B, T, HV), jnp.float32), shape((B, T, HV), dtype),
        shape((B, HV, D, value_dim), jnp.float32), shape((B, T), jnp.int32),
    )
    # jax >= 0.12 lowers Pallas Triton only with a GPU at hand: a compile-only H100 as the
    # default device is one.
    with jax.default_device(compile_only_gpu() if platform == "cuda" else None):
        exported = export.export(
            train_step_of_delta_rule(backend), platforms=[platform],
            disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
        )(*args)
    assert exported.platforms == (platform,)
    assert [g.shape for g in exported.out_avals[1:]] == [a.shape for a in args[:6]]
    return exported, args


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize(
    "platform, backend, custom_call",
    [("tpu", "mosaic", "tpu_custom_call"), ("cuda", "triton", TRITON_CALL)],
)
def test_forward_and_backward_export(platform, backend, custom_call, dtype):
    exported, _ = export_train_step(platform, backend, dtype)
    text = exported.mlir_module()
    # Nine kernel calls: inverse, prepare, state pass, output (forward); prepare again,
    # local dv, the reverse state pass, output and WY gradients (backward).
    assert text.count(custom_call) == 9, text.count(custom_call)


@pytest.mark.parametrize("platform, backend", [("tpu", "mosaic"), ("cuda", "triton")])
def test_value_head_dim_that_is_no_block_size_exports(platform, backend):
    """dv = 96 (a user's `linear_value_head_dim`): the kernels take zero-padded heads."""
    exported, _ = export_train_step(platform, backend, jnp.bfloat16, value_dim=96)
    # The kernels see v padded to whole chunks and to dv = 128: heads-first on TPU, in the
    # native [B, T, H, D] layout on GPU.
    padded = "1x4x256x128" if platform == "tpu" else "1x256x4x128"
    assert f"tensor<{padded}xbf16>" in exported.mlir_module()
