"""The whole train step of the small replica lowers for GPU (`cuda`) and TPU from this CPU
machine, with the kernel choices of that platform: the Pallas delta-rule kernels (Triton /
Mosaic), attention (blockwise XLA on GPU, splash on TPU), the experts' grouped matmul, the
expert-parallel `shard_map` and its all-to-alls, the fused loss, MTP and the optimizer. A
lowering error anywhere in the step fails here, not on the first device."""

from pathlib import Path

import pytest

from qnext_jax.config import ModelConfig
from qnext_jax.ops.causal_attention import resolve_implementation
from qnext_jax.ops.grouped_matmul import GroupedMatmulUnavailable
from qnext_jax.ops.chunked_delta.pallas import default_backend as delta_rule_backend
from qnext_jax.ops.platform import lowering_for, target_platform
from qnext_jax.parallel.mesh import MeshConfig, make_mesh
from qnext_jax.plan.compiler import target_devices
from qnext_jax.plan.targets import get_target
from qnext_jax.plan.trace import lower_train_step, planned_trainer

TRITON_CALL = "__gpu$xla.gpu.triton"
DELTA_RULE_KERNELS = 9  # forward 4 + backward 5, per traced DeltaNet layer


@pytest.fixture(scope="module")
def small():
    return ModelConfig.from_yaml(Path(__file__).parent.parent / "configs" / "small.yaml")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_small_replica_step_lowers(small, platform):
    # bf16, as on accelerators: tokamax's Mosaic GPU grouped GEMM takes bf16 (fp32 goes to
    # its Triton kernel).
    trainer = planned_trainer(small.replace(dtype="bfloat16"), MeshConfig(fsdp=2, expert=4), 8,
                              mesh=target_mesh(MeshConfig(fsdp=2, expert=4), platform))
    text = lower_train_step(trainer, global_batch=8, sequence_length=256, platform=platform).as_text()
    assert "mhlo.num_partitions = 8" in text
    assert text.count("all_to_all") >= 4  # the experts' dispatch and return, forward and backward
    triton, mosaic = text.count(TRITON_CALL), text.count("tpu_custom_call")
    if platform == "cuda":  # the delta rule through Triton, the experts through tokamax
        # (tokamax's own differentiation leaves a chlo.ragged_dot in the lowered text; the
        # compiled program holds no dense expert buffer: tests/test_compile_gpu.py)
        assert triton >= DELTA_RULE_KERNELS and text.count("mosaic_gpu") >= 3
    else:  # the delta rule's kernels, splash attention's forward, dq and dk/dv kernels, and
        # the experts' megablox gmm / tgmm (3 projections forward, 6 products backward)
        assert triton == 0 and mosaic >= DELTA_RULE_KERNELS + 3 + 9
        assert "ragged_dot" not in text


def test_one_trainer_lowered_for_two_platforms_gets_each_platform_kernels(small):
    """jax caches traces per function: the second platform must not reuse the first's trace.
    (A trainer lowered for a GPU needs a mesh of GPUs, so the two platforms here are TPU and
    CPU, whose kernel choices differ just as much: Mosaic kernels, XLA and interpret mode.)"""
    trainer = planned_trainer(small, MeshConfig(fsdp=2, expert=4), 8)
    tpu = lower_train_step(trainer, global_batch=8, sequence_length=256, platform="tpu").as_text()
    cpu = lower_train_step(trainer, global_batch=8, sequence_length=256, platform="cpu").as_text()
    assert "tpu_custom_call" in tpu and "ragged_dot" not in tpu
    assert "tpu_custom_call" not in cpu


def test_lowering_for_sets_the_kernel_choices_only_inside_it():
    assert target_platform() == "cpu"
    with lowering_for("cuda"):
        assert target_platform() == "gpu"
        assert delta_rule_backend() == "triton"
        assert resolve_implementation("auto", 256, 256) == "blockwise"
    with lowering_for("tpu"):
        assert delta_rule_backend() == "mosaic"
        assert resolve_implementation("auto", 256, 256) == "splash"
    assert target_platform() == "cpu" and delta_rule_backend() == "interpret"
    with pytest.raises(ValueError, match="platform must be one of"):
        with lowering_for("metal"):
            pass


def target_mesh(mesh_config, platform):
    """Compile-only devices of one GPU host or a TPU v5e-8 (tests/test_compile_*.py compile on
    them; here the step is only lowered)."""
    pytest.importorskip("jax_cuda12_plugin" if platform == "cuda" else "libtpu")
    return make_mesh(mesh_config, target_devices(get_target(
        "h100x8" if platform == "cuda" else "v5e-8")))


def test_lowering_for_a_gpu_never_falls_back_to_dense_experts(small):
    """tokamax refuses abstract arguments traced with the CPU as the default device; on the
    way to a GPU that is an error naming the fix, never XLA's dense ragged_dot (118 GiB for
    configs/gpu_1b.yaml on an 80 GB H100)."""
    pytest.importorskip("tokamax")
    trainer = planned_trainer(small, MeshConfig(fsdp=2, expert=4), 8)
    with pytest.raises(GroupedMatmulUnavailable, match="compile-only GPU as the default device"):
        lower_train_step(trainer, global_batch=8, sequence_length=256, platform="cuda")
