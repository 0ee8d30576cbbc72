"""The small runs the compile tests build for real targets: one block of the hybrid (3 DeltaNet
+ 1 attention), bf16 compute, remat, MTP, the experts' dimensions in whole 128-wide tiles (the
shapes the Mosaic GPU grouped GEMM and the kernels' tilings take) and a dense expert buffer
that would be unmistakable ([8 experts, every routed row, ...])."""

from qnext_jax.train.run_config import build_run_config

MODEL = {
    "vocab_size": 1024, "hidden_size": 128, "num_hidden_layers": 4, "full_attention_interval": 4,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128,
    "partial_rotary_factor": 0.25, "rope_theta": 10000.0, "max_position_embeddings": 4096,
    "linear_num_key_heads": 1, "linear_num_value_heads": 2, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "num_experts": 8,
    "num_experts_per_tok": 2, "moe_intermediate_size": 128,
    "shared_expert_intermediate_size": 128, "intermediate_size": 256,
    "mtp_num_hidden_layers": 1, "mtp_depth": 1, "bos_token_id": None, "eos_token_id": None,
    "dtype": "bfloat16", "remat_policy": "full",
}


def compile_run(mesh: dict, batch_size: int, seq_len: int, **model):
    return build_run_config({"model": {**MODEL, **model}, "mesh": mesh,
                             "train": {"batch_size": batch_size, "seq_len": seq_len}})


def compile_moe_layer(target_name: str, mesh: dict, tokens_per_device: int, **model):
    """One MoE layer's forward and backward (the experts' dispatch, grouped matmuls and
    return) compiled for a target on its compile-only devices: (memory analysis, the buffers
    live at the peak of its temporaries)."""
    import tempfile
    from pathlib import Path

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from qnext_jax.config import ModelConfig
    from qnext_jax.model.moe import SparseMoE
    from qnext_jax.ops.platform import lowering_for
    from qnext_jax.parallel.axes import ShardingRules
    from qnext_jax.parallel.mesh import BATCH_AXES, MeshConfig, make_mesh
    from qnext_jax.plan.compiler import peak_buffers, step_module, target_devices
    from qnext_jax.plan.targets import get_target

    target = get_target(target_name)
    devices = target_devices(target)
    mesh = make_mesh(MeshConfig(**mesh), devices)
    fields = set(ModelConfig.__dataclass_fields__)
    config = ModelConfig(**{k: v for k, v in {**MODEL, **model}.items() if k in fields})
    graph, params = nnx.split(nnx.eval_shape(lambda: SparseMoE(config, rngs=nnx.Rngs(0))))
    shardings = ShardingRules(config, mesh).param_shardings(params)
    params = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
        params, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    rows = len(devices)
    x = jax.ShapeDtypeStruct((rows, tokens_per_device, config.hidden_size), jnp.bfloat16,
                             sharding=NamedSharding(mesh, PartitionSpec(BATCH_AXES)))

    def loss(params, x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            out, _ = nnx.merge(graph, params)(x)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    with tempfile.TemporaryDirectory() as dump, jax.default_device(devices[0]), \
            lowering_for(target.platform):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile(
            {"xla_dump_to": dump})
        module = step_module(Path(dump))
        buffers = peak_buffers(module["live_range"].read_text(), module["hlo"].read_text())
    return compiled.memory_analysis(), buffers
