"""The train step compiled by libtpu's compiler for a TPU v5e-8 (fsdp 2 x expert 4;
compile-only): the Mosaic kernels (delta rule, splash attention, megablox) compiled, not only
lowered, the expert-parallel all-to-alls, no dense expert buffer, and the memory the compiler
assigns."""

import math

import pytest

pytest.importorskip("libtpu", reason="needs libtpu's compiler: pip install 'qnext_jax[aot]'")

from compile_configs import compile_run  # noqa: E402
from conftest import REPO_ROOT  # noqa: E402
from qnext_jax.plan.compiler import dense_expert_buffers  # noqa: E402
from qnext_jax.plan.planner import plan_run  # noqa: E402
from qnext_jax.plan.targets import get_target  # noqa: E402

BATCH, SEQ_LEN = 8, 512
# The delta rule (forward 4 + backward 5), splash (forward, dq, dkv) and megablox (2 products
# forward: gate and up fused, then down; 4 backward), at least once each.
MOSAIC_KERNELS = 9 + 3 + 6
EXPECTED_TEMPORARIES_MIB = 34.3
TOLERANCE = 0.25


@pytest.fixture(scope="module")
def plan():
    return plan_run(compile_run({"fsdp": 2, "expert": 4}, BATCH, SEQ_LEN), get_target("v5e-8"))


def test_kernels_and_collectives_compile(plan):
    calls = plan.compiled.custom_calls
    assert calls.get("tpu_custom_call", 0) >= MOSAIC_KERNELS, calls
    assert plan.compiled.hlo.count("all-to-all") >= 4  # the experts' dispatch and return, fwd+bwd
    routed_rows = BATCH * SEQ_LEN * plan.config.model.num_experts_per_tok
    assert dense_expert_buffers(plan.compiled.hlo, plan.config.model.num_experts,
                                routed_rows) == []


def test_memory_from_the_compiler(plan):
    c = plan.compiled
    if EXPECTED_TEMPORARIES_MIB is not None:
        assert c.temporaries / 2 ** 20 == pytest.approx(EXPECTED_TEMPORARIES_MIB, rel=TOLERANCE)
    assert plan.fits and c.peak_buffers


def test_a_program_the_compiler_refuses_is_a_plan_that_does_not_fit(capsys):
    """The TPU compiler refuses a program over its HBM in .compile(): the planner reports the
    compiler's own figures and what would help, and exits 1 (no traceback)."""
    from qnext_jax.plan.__main__ import main

    code = main([str(REPO_ROOT / "configs" / "tiny.yaml"), "--target", "v5e-8",
                 "train.batch_size=8", "train.seq_len=32768", "model.max_position_embeddings=32768",
                 "model.dtype=bfloat16", "model.attention_impl=xla", "mesh.fsdp=2",
                 "mesh.expert=4"])
    out = capsys.readouterr().out
    assert code == 1
    assert "the compiler refused the program" in out and "RESOURCE_EXHAUSTED" in out
    assert "DOES NOT FIT" in out and "model.remat_policy=full" in out


def test_expert_parallel_rows_are_proportional_to_n_k():
    """One MoE layer (64 experts, top 8, expert 8, 4,096 tokens a device, capacity factor
    1.25) compiled, forward and backward: the grouped matmuls' rows are c * n * k = 40,960, not
    one per received id (S * C * k = 262,144, the dropless worst case)."""
    from compile_configs import compile_moe_layer

    tokens, top_k, shards, factor = 4096, 8, 8, 1.25
    memory, buffers = compile_moe_layer(
        "v5e-8", {"fsdp": 1, "expert": shards}, tokens, hidden_size=512, num_experts=64,
        num_experts_per_tok=top_k, moe_capacity_factor=factor)
    row_counts = {int(b.shape.split("[")[1].split(",")[0]) for b in buffers
                  if b.shape.endswith((",512]", ",128]")) and b.shape.count(",") == 1}
    assert max(row_counts) == math.ceil(factor * tokens * top_k), sorted(row_counts)
    assert memory.temp_size_in_bytes < 400 * 2 ** 20  # 1.0 GiB dropless (S * n * k rows)


def test_every_parameter_is_split_over_all_eight_chips(plan):
    """fsdp 2 x expert 4: the dense weights' width and the experts' (expert-sharded) width are
    split over every axis that would otherwise replicate them. The compiler's arguments equal
    the sharding's arithmetic: fp32 parameters and two AdamW moments (12 bytes a parameter)
    divided by the devices each is split over, plus a chip's row of the batch; within 5%, the
    TPU's tile padding of this small model's thin shards (the 80B's arguments agree to 0.1%,
    docs/long_context.md)."""
    import math

    import jax
    from flax import nnx

    from qnext_jax.model import Qwen3NextModel
    from qnext_jax.parallel.axes import ShardingRules, spec_axes
    from qnext_jax.parallel.mesh import make_abstract_mesh

    config = plan.config
    model = nnx.eval_shape(lambda: Qwen3NextModel(config.model, rngs=nnx.Rngs(0)))
    rules = ShardingRules(config.model, make_abstract_mesh(config.mesh, 8))
    sizes = dict(zip(rules.mesh.axis_names, rules.mesh.axis_sizes))
    state = 0
    replicated = 0
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shards = math.prod(sizes[a] for part in rules.param_spec(variable) for a in spec_axes(part))
        state += 12 * variable.size / shards
        replicated += variable.size if shards == 1 else 0
    parameters = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert replicated < 0.01 * parameters  # norm weights only
    batch = 5 * BATCH * SEQ_LEN * 4 // 8  # ids, targets, masks, segments, positions (int32)
    assert plan.compiled.arguments == pytest.approx(state + batch, rel=0.05)
