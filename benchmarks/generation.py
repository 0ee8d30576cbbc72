"""Decoding speed on CPU: our cached decoder beside `transformers`' (same model, greedy, batch
1, fp32, same cores, one after the other), per-token latency against context length, and MTP
self-speculative decoding on a trained replica (plain vs D drafts, acceptance per depth) and on
a 1B bf16 model, where a decode step is memory-bound (part 5).

    python benchmarks/generation.py                                # parts 1 and 2, random model
    python benchmarks/generation.py --run-dir runs/<time>          # + part 3 on a trained run
    python benchmarks/generation.py --contexts 512 2048 --skip-transformers
    python benchmarks/generation.py --parts 4   # rollback: per-position states vs recompute
    python benchmarks/generation.py --parts 5 --depths 1 2   # speculative on a 1B bf16 model

The model is configs/small.yaml (the default replica) with max_position_embeddings raised to
cover the longest context (RoPE has no table to outgrow). Decode rate = tokens after the first
step / time after the first step, so prefill and compilation are excluded on both sides; for
transformers, its model called a token at a time with its cache, timed the same way.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


def small_config(max_context: int, **changes):
    from qnext_jax.config import ModelConfig

    config = ModelConfig.from_yaml(REPO_ROOT / "configs" / "small.yaml")
    return config.replace(max_position_embeddings=max(config.max_position_embeddings,
                                                      2 * max_context), **changes)


def ours_rate(model, prompt, new_tokens: int, repeats: int = 2) -> float:
    from qnext_jax.generate import Generator

    generator = Generator(model)
    rates = []
    for _ in range(repeats):  # the first call compiles; the best of the rest is reported
        rates.append(generator.generate([prompt], max_new_tokens=new_tokens).tokens_per_second)
    return max(rates[1:] if len(rates) > 1 else rates)


def transformers_rate(hf_model, prompt, new_tokens: int) -> float:
    """transformers' own greedy loop with its cache (what `generate` runs, without its
    per-step bookkeeping), timed after prefill and a first step; best of two."""
    import torch

    rates = []
    with torch.no_grad():
        for _ in range(2):
            out = hf_model(torch.tensor([prompt]), use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            out = hf_model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = hf_model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            rates.append((new_tokens - 1) / (time.perf_counter() - start))
    return max(rates)


def to_transformers(model):
    from transformers import Qwen3NextForCausalLM

    from qnext_jax.convert import save_hf_checkpoint

    directory = Path(tempfile.mkdtemp(prefix="qnext_generation_bench_"))
    save_hf_checkpoint(model, directory)
    hf_model = Qwen3NextForCausalLM.from_pretrained(directory).float().eval()
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    return hf_model


def part_one(contexts, new_tokens, skip_transformers):
    """Ours beside transformers, the small replica, random weights (speed does not depend on
    what the weights are)."""
    from flax import nnx

    from qnext_jax.model.transformer import Qwen3NextModel

    config = small_config(max(contexts), mtp_num_hidden_layers=0)
    model = Qwen3NextModel(config, rngs=nnx.Rngs(0))
    hf_model = None if skip_transformers else to_transformers(model)
    rng = np.random.default_rng(0)
    rows = []
    for context in contexts:
        prompt = [int(t) for t in rng.integers(0, config.vocab_size, context)]
        row = {"context": context, "ours": ours_rate(model, prompt, new_tokens)}
        if hf_model is not None:
            row["transformers"] = transformers_rate(hf_model, prompt, new_tokens)
            row["ratio"] = row["ours"] / row["transformers"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def part_two(contexts, new_tokens):
    """ms per decoded token against context: the hybrid replica and the same replica with
    every layer a DeltaNet (no KV cache: its cost should not grow with context)."""
    from flax import nnx

    from qnext_jax.config import LINEAR_ATTENTION
    from qnext_jax.model.transformer import Qwen3NextModel

    rows = []
    for name, changes in (("hybrid 3:1", {}),
                          ("all DeltaNet", {"layer_types": (LINEAR_ATTENTION,) * 8})):
        model = Qwen3NextModel(small_config(max(contexts), mtp_num_hidden_layers=0, **changes),
                               rngs=nnx.Rngs(0))
        for context in contexts:
            prompt = [int(t) for t in np.random.default_rng(1).integers(0, 8192, context)]
            rate = ours_rate(model, prompt, new_tokens)
            rows.append({"model": name, "context": context, "ms_per_token": 1e3 / rate})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def part_three(run_dir, depths, new_tokens, batch):
    """Plain vs speculative greedy decoding on a trained run; the prompts open held-out files
    of the embedded corpus (the eval split: the kind of text the replica learned, unseen)."""
    from qnext_jax.data.sources import stdlib_corpus
    from qnext_jax.generate import Generator
    from qnext_jax.generate.sources import load_for_generation

    model, tokenizer, source = load_for_generation(run_dir)
    print(f"# {source}", flush=True)
    documents = [text for name, text in stdlib_corpus("eval")
                 if name.endswith(".py") and len(text) > 2000][:batch]
    prompts = [tokenizer.tokenizer.encode(d[:600], add_special_tokens=False).ids[:128]
               for d in documents]
    rows, reference = [], None
    for depth in (0, *depths):
        generator = Generator(model, speculative=depth)
        generator.generate(prompts, max_new_tokens=8)  # compile
        result = generator.generate(prompts, max_new_tokens=new_tokens)
        if depth == 0:
            reference = result.tokens
        row = {"drafts": depth, "tokens_per_s": result.tokens_per_second,
               "tokens_per_model_call": result.tokens_per_round if depth else 1.0,
               "acceptance_per_depth": result.acceptance, "same_tokens": result.tokens == reference}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def part_four(depth: int, context: int = 512, repeats: int = 20):
    """Rolling a rejected draft back: keeping the DeltaNet state after every verified position
    (what the decoder does) against verifying without them and recomputing the accepted
    tokens from the old caches (a second main-model forward). Median ms per round's main-model
    work, batch 1, the small replica."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qnext_jax.generate.cache import commit, main_cache
    from qnext_jax.generate.cached_stack import main_extend
    from qnext_jax.model.transformer import Qwen3NextModel

    model = Qwen3NextModel(small_config(context, mtp_num_hidden_layers=0), rngs=nnx.Rngs(0))
    graph, params = nnx.split(model)
    prompt = jnp.asarray(np.random.default_rng(2).integers(0, 8192, (1, context)), jnp.int32)

    @jax.jit
    def prefill(params):
        model = nnx.merge(graph, params)
        cache = main_cache(model.config, 1, context + 64)
        length = jnp.full((1,), context, jnp.int32)
        _, pending = main_extend(model, cache, prompt, length, fresh=True, per_position=False)
        return commit(cache, pending, length, stacked=True)

    verify = jnp.zeros((1, depth + 1), jnp.int32)
    keep = jnp.full((1,), depth, jnp.int32)  # one draft rejected: roll back one position
    full = jnp.full((1,), depth + 1, jnp.int32)

    @jax.jit
    def keep_states(params, cache):
        model = nnx.merge(graph, params)
        hidden, pending = main_extend(model, cache, verify, full, fresh=False, per_position=True)
        return hidden, commit(cache, pending, keep, stacked=True)

    @jax.jit
    def recompute(params, cache):
        model = nnx.merge(graph, params)
        hidden, _ = main_extend(model, cache, verify, full, fresh=False, per_position=False)
        _, pending = main_extend(model, cache, verify, keep, fresh=False, per_position=False)
        return hidden, commit(cache, pending, keep, stacked=True)

    cache = prefill(params)
    rows = {}
    for name, fn in (("keep per-position states", keep_states),
                     ("recompute accepted tokens", recompute)):
        jax.block_until_ready(fn(params, cache))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(params, cache))
            times.append(time.perf_counter() - start)
        rows[name] = 1e3 * float(np.median(times))
    print(json.dumps({"drafts": depth, "ms_per_round": rows}), flush=True)
    return rows


def part_five(depths, new_tokens, dtype: str = "bfloat16", context: int = 256):
    """Speculative decoding where it pays: a model large enough for a decode step to be
    memory-bound on this CPU (configs/gpu_1b.yaml, 1.03B parameters, bf16, batch 1), plain vs
    D drafts in the same run. Its MTP drafts are right about half the time (random weights
    made draftable: generate/draftable.py), so the rounds keep what a trained model's would
    at a lower acceptance."""
    from qnext_jax.config import ModelConfig
    from qnext_jax.generate import Generator
    from qnext_jax.generate.draftable import draftable_model

    config = ModelConfig.from_yaml(REPO_ROOT / "configs" / "gpu_1b.yaml").replace(
        param_dtype=dtype, dtype=dtype, mtp_depth=max(depths))
    model = draftable_model(config)
    prompt = [[int(t) for t in np.random.default_rng(3).integers(0, config.vocab_size, context)]]
    rows, reference, step_ms = [], None, None
    for depth in (0, *depths):
        generator = Generator(model, speculative=depth)
        generator.generate(prompt, max_new_tokens=8)  # compile
        result = max((generator.generate(prompt, max_new_tokens=new_tokens) for _ in range(2)),
                     key=lambda r: r.tokens_per_second)
        per_call = result.tokens_per_round if depth else 1.0
        call_ms = 1e3 * per_call / result.tokens_per_second  # a step, or a round
        if depth == 0:
            reference, step_ms = result.tokens, call_ms
        # A round beats a step once it keeps more tokens than it costs steps.
        row = {"model": f"gpu_1b {dtype}", "drafts": depth,
               "tokens_per_s": result.tokens_per_second, "ms_per_model_call": call_ms,
               "tokens_per_model_call": per_call, "break_even_tokens": call_ms / step_ms,
               "acceptance_per_depth": result.acceptance,
               "same_tokens": result.tokens == reference}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--latency-contexts", type=int, nargs="+",
                        default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--run-dir", help="a trained run for part 3 (speculative decoding)")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="part 5's parameters and compute")
    args = parser.parse_args()
    import jax

    print(f"# jax {jax.__version__}, {jax.devices()[0].device_kind}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    if 1 in args.parts:
        part_one(args.contexts, args.new_tokens, args.skip_transformers)
    if 2 in args.parts:
        part_two(args.latency_contexts, args.new_tokens)
    if 3 in args.parts and args.run_dir:
        part_three(args.run_dir, args.depths, args.new_tokens, args.batch)
    if 4 in args.parts:
        for depth in args.depths:
            part_four(depth)
    if 5 in args.parts:
        part_five(args.depths, args.new_tokens, args.dtype)


if __name__ == "__main__":
    main()
