"""The planner's parts that need no compile: targets by name, the checks before compiling,
reading XLA's dumps, the verdict and its advice, and the command line's errors."""

import dataclasses
import sys

import pytest

from compile_configs import compile_run
from conftest import REPO_ROOT
from qnext_jax.config import ConfigError
from qnext_jax.plan.__main__ import main
from qnext_jax.plan.compiler import (Buffer, Compiled, CompilerMissing, custom_call_targets,
                                     dense_expert_buffers, peak_buffers, target_devices,
                                     tuple_element)
from qnext_jax.plan.planner import Plan, plan_run
from qnext_jax.plan.targets import GPU_CHIPS, UnknownTarget, get_target, known_targets

GiB = 1024 ** 3


def test_targets_by_name():
    h100 = get_target("h100")
    assert (h100.platform, h100.chips, h100.gpu_topology) == ("cuda", 1, "1x1x1")
    hosts = get_target("h100x8", hosts=8)
    assert (hosts.chips, hosts.gpu_topology, hosts.name) == (64, "8x1x8", "8xh100x8")
    v5p = get_target("v5p-128")  # TensorCores in the name: 64 chips
    assert (v5p.platform, v5p.chips, v5p.tpu_topology) == ("tpu", 64, "v5p:4x4x4")
    v6e = get_target("v6e-256", slices=2)
    assert (v6e.chips, v6e.tpu_topology, v6e.slices) == (512, "v6e:16x16", 2)
    assert get_target("B200").gpu.compute_capability == (10, 0)
    assert "v5e-8" in known_targets() and "a100x8" in known_targets()


@pytest.mark.parametrize("name, kwargs, message", [
    ("h1000", {}, "did you mean h100"),
    ("v5p-6", {}, "known targets: h100, h100x8"),
    ("h100", {"hosts": 2}, "needs a host of eight GPUs: h100x8"),
    ("v5e-8", {"hosts": 2}, "use --slices"),
    ("h200x8", {"slices": 2}, "use --hosts"),
])
def test_unknown_or_impossible_targets_say_what_exists(name, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        get_target(name, **kwargs)
    assert issubclass(UnknownTarget, ConfigError)


def test_gpu_target_config_holds_the_chip():
    text = GPU_CHIPS["h100"].target_config()
    assert "core_count: 132" in text and "cuda_compute_capability { major: 9 minor: 0 }" in text
    assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text


def test_a_missing_compiler_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax_cuda12_plugin", None)  # import fails
    with pytest.raises(CompilerMissing, match=r"pip install 'qnext_jax\[aot\]'"):
        target_devices(get_target("h100"))
    monkeypatch.setitem(sys.modules, "libtpu", None)
    with pytest.raises(CompilerMissing, match="libtpu"):
        target_devices(get_target("v5e-8"))


def test_a_mesh_that_does_not_cover_the_target_fails_before_compiling():
    config = compile_run({"fsdp": 2, "expert": 4}, 8, 512)
    with pytest.raises(ConfigError, match="has 8 devices but 64 are available"):
        plan_run(config, get_target("v5p-128"))
    with pytest.raises(ConfigError, match="multiple of the batch shards"):
        plan_run(compile_run({"fsdp": 8}, 4, 512), get_target("v5e-8"))


def test_command_line_errors_exit_2(capsys):
    tiny = str(REPO_ROOT / "configs" / "tiny.yaml")
    assert main([tiny, "--target", "h1000"]) == 2
    assert "did you mean h100" in capsys.readouterr().err
    assert main([tiny, "--target", "v5e-8", "mesh.fsdp=3"]) == 2
    assert "mesh" in capsys.readouterr().err
    assert main(["--list-targets"]) == 0
    assert "v5p-128" in capsys.readouterr().out.split()


LIVE_RANGES = """HloLiveRange (max 9):
  Live ranges at 5 (peak):
    fusion.3{}: 4096 bytes (cumulative: 4096 bytes)
    while.1{1}: 1024 bytes (cumulative: 5120 bytes)
    while.1{}: 16 bytes (cumulative: 5136 bytes)
    custom-call.7{}: 65536 bytes (cumulative: 70672 bytes)
  Stack trace breakdown for peak usage: 70 672 bytes
    main (100.0%, total: 70 672 bytes)
"""
HLO = """
  %fusion.3 = f32[32,32]{1,0} fusion(%p), kind=kLoop, metadata={op_name="jit(step)/jvp()/while/body/dot_general" stack_frame_id=3}
  %while.1 = (s32[], bf16[16,32]{1,0}) while(%t), condition=%c, body=%b
  ROOT %custom-call.7 = bf16[128,256]{1,0} custom-call(%x), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/transpose(jvp())/pallas_call"}
  %custom-call.8 = bf16[8,8]{1,0} custom-call(%x), custom_call_target="mosaic_gpu_v2"
"""


def test_peak_buffers_name_the_operations_that_make_them():
    buffers = peak_buffers(LIVE_RANGES, HLO)
    assert [b.size for b in buffers] == [65536, 4096, 1024]  # the tuple's pointer table dropped
    assert buffers[0].shape == "bf16[128,256]" and buffers[0].op == "transpose(jvp())/pallas_call"
    assert buffers[1].op == "jvp()/while/body/dot_general"
    assert buffers[2].shape == "bf16[16,32]" and buffers[2].op == "while (output 1)"
    assert custom_call_targets(HLO) == {"__gpu$xla.gpu.triton": 1, "mosaic_gpu_v2": 1}
    assert tuple_element("(f32[2], (s32[], /*index=1*/bf16[4,5]))", [1, 1]) == "bf16[4,5]"


def test_dense_expert_buffers_are_found_by_their_two_dimensions():
    hlo = "%a = bf16[64,262144,1024] dot(...)\n%b = bf16[262144,1024] add(...)\n%c = s32[64,8]"
    assert dense_expert_buffers(hlo, num_experts=64, routed_rows=262144) == ["[64,262144,1024]"]
    assert dense_expert_buffers("%b = bf16[262144,1024]", 64, 262144) == []


def _plan(arguments, temporaries, **train):
    config = compile_run({"fsdp": 1}, train.get("batch_size", 8), 512,
                         remat_policy=train.get("remat", "full"))
    compiled = Compiled(arguments=arguments, outputs=arguments, aliased=arguments,
                        temporaries=temporaries, generated_code=0,
                        peak=arguments + temporaries,
                        peak_buffers=[Buffer("fusion.1{}", temporaries, "bf16[8,512,128]", "dot")],
                        flops=1e12, bytes_accessed=1e11, custom_calls={}, compile_seconds=1.0,
                        hlo="")
    return Plan(target=get_target("h100"), config=config,
                mesh={"data": 1, "fsdp": 1, "expert": 1, "sequence": 1, "tensor": 1},
                compiled=compiled, model_flops=2e12, headroom=0.1)


def test_verdict_headroom_and_roofline():
    plan = _plan(10 * GiB, 50 * GiB)
    assert plan.compiled.peak == 60 * GiB and plan.fits  # 60 GiB of 79.1, budget 71.2
    assert not dataclasses.replace(plan, headroom=0.3).fits
    assert plan.compute_seconds == pytest.approx(2e12 / 989e12)  # the model's FLOPs, larger
    assert plan.memory_seconds == pytest.approx(1e11 / 3.35e12)
    assert plan.floor_seconds == plan.memory_seconds
    assert plan.advice() == []


def test_advice_names_what_would_help():
    activations = _plan(10 * GiB, 80 * GiB, remat="dots")
    tips = "\n".join(activations.advice())
    assert "model.remat_policy=full (now dots)" in tips and "train.micro_batches=2" in tips
    weights = _plan(60 * GiB, 20 * GiB)
    assert "mesh.fsdp" in "\n".join(weights.advice())


def test_a_step_that_cannot_fit_stops_before_allocating_and_one_that_fits_runs_compiled():
    """train.check_memory on a device with an allocator limit (on CPU the limit is passed in:
    the host has none): the step compiled ahead, refused over the limit, else run as compiled
    with the same results as the jitted step."""
    import jax
    import numpy as np

    from qnext_jax.parallel.axes import ShardingRules
    from qnext_jax.parallel.mesh import MeshConfig, make_mesh
    from qnext_jax.train.memory_check import DoesNotFit, compile_checked, device_memory_limit
    from qnext_jax.train.step import trainer_for_run
    from step_setup import packed_batch

    config = compile_run({"fsdp": 1}, 2, 64, dtype="float32", num_experts=4,
                         moe_intermediate_size=32, hidden_size=64, vocab_size=256)
    mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    trainer = trainer_for_run(config, ShardingRules(config.model, mesh))
    assert device_memory_limit(trainer) is None  # a CPU: nothing to check against
    assert compile_checked(trainer, config, None) is trainer
    with pytest.raises(DoesNotFit, match=r"needs .* GiB a device .* allocator holds 0.00 GiB. "
                                         r"Try: \S+"):  # the planner's advice
        compile_checked(trainer, config, limit=1024)
    checked = compile_checked(trainer, config, limit=64 * GiB)
    assert checked.step is not trainer.step
    batch = jax.device_put(packed_batch(rows=2, length=64), trainer.batch_sharding)
    _, jitted = trainer.step(trainer.init(), batch)
    _, compiled = checked.step(trainer.init(), batch)
    np.testing.assert_allclose(float(compiled["loss"]), float(jitted["loss"]), rtol=1e-6)
