"""Parameters for generation in the dtype it computes in, read tensor by tensor: a run's fp32
checkpoint and a Hugging Face directory load as bf16 (the fp32-only A_log and dt_bias kept),
equal to the trained values rounded once; and loading a bf16 directory never holds an fp32
copy of the model (peak resident memory of the loading process, measured)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from generation_models import tiny_config
from qnext_jax.convert import save_hf_checkpoint
from qnext_jax.generate import Generator
from qnext_jax.generate.sources import load_for_generation
from qnext_jax.model.transformer import Qwen3NextModel
from qnext_jax.train.checkpoint import Checkpoints
from qnext_jax.train.step import TrainState


def params_of(model):
    return jax.tree.leaves_with_path(nnx.state(model, nnx.Param))


def test_a_bf16_runs_checkpoint_loads_in_bf16(tmp_path):
    config = tiny_config(dtype="bfloat16")  # fp32 parameters, bf16 compute: a bf16 run
    model = Qwen3NextModel(config, rngs=nnx.Rngs(0))
    (tmp_path / "config.json").write_text(json.dumps({"model": config.to_dict()}))
    _, params = nnx.split(model, nnx.Param)
    checkpoints = Checkpoints(tmp_path / "checkpoints", async_save=False)
    checkpoints.save(3, TrainState(jnp.asarray(3, jnp.int32), params, optax.adam(1e-3).init(params)),
                     {"position": 0})
    checkpoints.close()
    loaded, _, source = load_for_generation(tmp_path)
    assert "parameters in bfloat16" in source
    for (path, ours), (_, trained) in zip(params_of(loaded), params_of(model)):
        name = jax.tree_util.keystr(path)
        expected = trained if trained.dtype == jnp.float32 and ("A_log" in name or "dt_bias" in name) \
            else trained.astype(jnp.bfloat16)
        assert ours.dtype == expected.dtype, name
        np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(expected, np.float32))
    # Greedy decoding from the loaded model equals the trained model's with its weights in bf16.
    cast = Qwen3NextModel(config.replace(param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(cast, nnx.state(loaded, nnx.Param))
    prompt = [[5, 9, 11, 3]]
    assert (Generator(loaded).generate(prompt, max_new_tokens=6).tokens
            == Generator(cast).generate(prompt, max_new_tokens=6).tokens)
    full, _, _ = load_for_generation(tmp_path, dtype="float32")
    assert all(p.dtype == jnp.float32 for _, p in params_of(full))


# Anonymous memory only: the safetensors are memory-mapped, and the file pages read count in
# the resident set too (page cache, not a copy). Sampled every millisecond while loading.
LOAD = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    import jax
    from qnext_jax.generate.sources import load_for_generation

    def anonymous():  # kB
        line = next(l for l in Path("/proc/self/status").read_text().splitlines()
                    if l.startswith("RssAnon:"))
        return int(line.split()[1])

    jax.numpy.zeros(1).block_until_ready()
    before, peak, loading = anonymous(), [0], True

    def sample():
        while loading:
            peak[0] = max(peak[0], anonymous())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    model, _, _ = load_for_generation(sys.argv[1], dtype=sys.argv[2])
    jax.block_until_ready(jax.tree.leaves(model))
    loading = False
    sampler.join()
    print(json.dumps({"peak_added_kib": max(peak[0], anonymous()) - before}))
""")


def peak_added_by_loading(directory, dtype) -> float:
    out = subprocess.run([sys.executable, "-c", LOAD, str(directory), dtype],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_added_kib"] * 1024


def test_loading_a_bf16_directory_holds_no_fp32_copy(tmp_path):
    # ~60M parameters (120 MB in bf16), spread over many stacked leaves.
    config = tiny_config(hidden_size=512, num_experts=32, moe_intermediate_size=256,
                         vocab_size=8192, num_hidden_layers=8, dtype="bfloat16",
                         param_dtype="bfloat16")
    model = Qwen3NextModel(config, rngs=nnx.Rngs(0))
    save_hf_checkpoint(model, tmp_path)
    leaves = [p for _, p in params_of(model)]
    total = sum(p.size * p.dtype.itemsize for p in leaves)
    largest = max(p.size * p.dtype.itemsize for p in leaves)
    assert total > 100e6
    added = peak_added_by_loading(tmp_path, "auto")
    # The model in bf16, one leaf assembled on the host beside its device copy, and slack;
    # an fp32 copy of the model would add 2 x total on top of the bf16 one.
    assert total < added < total + 2 * largest + 64e6, (added / 1e6, total / 1e6, largest / 1e6)
    # The measurement sees such a copy: loading in fp32 holds twice the bytes.
    assert peak_added_by_loading(tmp_path, "float32") > 1.8 * total
