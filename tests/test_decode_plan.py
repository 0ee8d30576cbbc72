"""The decode step compiled for 8 H100s (XLA:GPU, compile-only devices) on a tensor x data
mesh: the program's arguments are exactly the parameters' and caches' shards the layout gives
(the floor's own accounting), its few routed rows gather their experts (no grouped-matmul
kernel, whose operand would be every expert of the layer), and a speculative round reads the
MTP layer too."""


import pytest

from generation_models import tiny_config
from qnext_jax.plan.decode import plan_decode
from qnext_jax.plan.targets import get_target

pytest.importorskip("tokamax")


@pytest.mark.parametrize("depth", [0, 1])
def test_decode_step_compiles_for_eight_h100s(depth):
    config = tiny_config(dtype="bfloat16", num_experts_per_tok=5)
    plan = plan_decode(config, get_target("h100x8"), {"tensor": 2, "data": 4}, batch=1,
                       cache_length=256, depth=depth)
    assert plan.rows == 4  # padded to the data shards
    compiled, floor = plan.compiled, plan.floor
    assert not compiled.refusal
    if depth == 0:  # 4 tokens x 5 choices for 8 experts (a round verifies 8 tokens: kernels)
        assert not compiled.custom_calls, compiled.custom_calls
    # Arguments: parameter and state shards, as the floor counts them, and the step limit.
    assert compiled.arguments == plan.argument_bytes + 4
    assert floor.dense > 0 and floor.experts > 0 and floor.caches > 0
    assert (floor.mtp > 0) == bool(depth) and floor.tokens_per_row == depth + 1
    # One row's token chooses 5 of 8 experts; 4 rows almost all of them.
    assert floor.experts < floor.experts_held
