"""Decoding on an 8-device CPU mesh equals one device, token for token (greedy): tensor x
expert (heads and widths over `tensor`, experts over `expert`, rows padded to the 4 row shards
of a batch of 1 or 3) and data x tensor, plain and speculative; parameters and caches sit on
the shards the logical-axis table gives; meshes decoding cannot use are refused by name."""

import functools

import jax
import numpy as np
import pytest

from generation_models import draftable_model, tiny_config
from qnext_jax.generate.generator import Generator, initial_state, jit_on_mesh
from qnext_jax.generate.sampling import SamplingSettings
from qnext_jax.generate.sharding import generation_mesh, padded_rows
from qnext_jax.parallel.mesh import MeshError

MAX_NEW = 10


@pytest.fixture(scope="module")
def setup():
    config = tiny_config(vocab_size=32, mtp_depth=2)
    model = draftable_model(config)
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, 32, n)) for n in (9, 23, 2)]
    one_device = {}

    def reference(depth, rows):
        if (depth, rows) not in one_device:
            one_device[depth, rows] = Generator(model, speculative=depth).generate(
                prompts[:rows], max_new_tokens=MAX_NEW).tokens
        return one_device[depth, rows]

    return model, prompts, reference


@pytest.mark.parametrize("layout, depth, rows", [
    ({"tensor": 2, "expert": 4}, 0, 1), ({"tensor": 2, "expert": 4}, 2, 3),
    ({"data": 4, "tensor": 2}, 2, 1), ({"data": 4, "tensor": 2}, 0, 3)])
def test_sharded_decoding_equals_one_device(setup, layout, depth, rows):
    model, prompts, reference = setup
    mesh = generation_mesh(layout)
    generator = Generator(model, speculative=depth, mesh=mesh)
    result = generator.generate(prompts[:rows], max_new_tokens=MAX_NEW)
    assert result.tokens == reference(depth, rows)
    assert padded_rows(rows, mesh) == 4


def test_parameters_and_caches_sit_on_their_shards(setup):
    model = setup[0]
    mesh = generation_mesh({"tensor": 2, "expert": 4})
    generator = Generator(model, speculative=1, mesh=mesh)
    layers = generator.params["blocks"]["layers"]
    experts = layers[0]["mlp"]["gate_proj"].value  # [blocks, experts, embed, mlp]
    assert experts.sharding.shard_shape(experts.shape)[1:] == (8 // 4, 64, 32 // 2)
    # Dense weights whole along the model width (no ZeRO gather per token), heads over tensor.
    query = layers[3]["mixer"]["q_proj"].value  # [blocks, embed, heads, head_dim]
    assert query.sharding.shard_shape(query.shape)[1:3] == (64, 4 // 2)
    state = jit_on_mesh(functools.partial(initial_state, model.config, 1), mesh,
                        generator.rules, static_argnums=(0, 1, 2))(
        4, 64, SamplingSettings(), jax.numpy.ones(4, "int32"), jax.numpy.zeros(4, bool),
        jax.random.key(0))
    key_cache = state.main.layers[3].key  # [blocks, B, kv_heads, L, D]
    assert key_cache.sharding.shard_shape(key_cache.shape) == (2, 1, 1, 64, 16)
    delta_state = state.main.layers[0].state  # [blocks, B, Hv, dk, dv]
    assert delta_state.sharding.shard_shape(delta_state.shape) == (2, 1, 2, 16, 16)


def test_meshes_decoding_cannot_use_are_refused():
    with pytest.raises(MeshError, match="mesh.sequence = 2"):
        generation_mesh({"sequence": 2, "tensor": 4})
    with pytest.raises(MeshError, match="mesh.fsdp = 2"):
        generation_mesh({"fsdp": 2})
    with pytest.raises(MeshError, match="16 devices but 8"):
        generation_mesh({"tensor": 4, "expert": 4})


def test_loading_onto_a_mesh_reads_every_parameter_into_its_shards(setup, tmp_path):
    """A Hugging Face directory and a run checkpoint, each loaded onto the mesh: every
    parameter on the shards the table gives (as Generator would place it), values equal to the
    one-device load, and decoding from it equal to one device's."""
    import json

    import jax.numpy as jnp
    import optax
    from flax import nnx

    from qnext_jax.convert import save_hf_checkpoint
    from qnext_jax.generate.sources import load_for_generation
    from qnext_jax.train.checkpoint import Checkpoints
    from qnext_jax.train.step import TrainState

    model, prompts, reference = setup
    save_hf_checkpoint(model, tmp_path / "hf")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": model.config.to_dict()}))
    _, params = nnx.split(model, nnx.Param)
    checkpoints = Checkpoints(run / "checkpoints", async_save=False)
    checkpoints.save(1, TrainState(jnp.asarray(1, jnp.int32), params,
                                   optax.adam(1e-3).init(params)), {"position": 0})
    checkpoints.close()
    mesh = generation_mesh({"tensor": 2, "expert": 4})
    placed = jax.tree.leaves(Generator(model, mesh=mesh).params)
    for source in (tmp_path / "hf", run):
        loaded, _, _ = load_for_generation(source, dtype="float32", mesh=mesh)
        leaves = jax.tree.leaves(nnx.state(loaded))
        assert len(leaves) == len(placed)
        for ours, expected in zip(leaves, placed):
            assert ours.sharding.is_equivalent_to(expected.sharding, ours.ndim), source
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))
        result = Generator(loaded, mesh=mesh).generate(prompts[:1], max_new_tokens=MAX_NEW)
        assert result.tokens == reference(0, 1)
