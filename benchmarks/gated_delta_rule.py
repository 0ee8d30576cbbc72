"""Gated delta rule speed: our implementations side by side with the peers, in one run.

Peers, same inputs, forward and forward+backward (one gradient evaluation, forward included):
  CPU: our `chunked` vs transformers' `torch_chunk_gated_delta_rule` (its fallback without FLA).
  GPU: our `pallas` and `chunked` vs flash-linear-attention's `chunk_gated_delta_rule`
       (install its wheel on the GPU machine; skipped with a note when it is missing).
Rounds are interleaved (every implementation once per round, best of the rounds) so that a
noisy machine slows every row alike. Prints markdown tables for docs/benchmarks.md.

    python benchmarks/gated_delta_rule.py                   # the default shapes of the platform
    python benchmarks/gated_delta_rule.py --shapes small --rounds 7

Shapes: "small" = B=2, T=2048, Hk=Hv=8, d=64 (the CPU acceptance shape); "qwen3" = the
Qwen3-Next head shape Hk=16, Hv=32, d=128 at B*T = 8K and 32K tokens (GPU; far too slow on CPU).
TFLOP/s counts the chunked algorithm's work at C = 64 (`chunked_flops`) for every row, so rows
compare as throughput; it is not the naive recurrence's count.
"""

import argparse
import datetime
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from gpu.delta_rule_inputs import chunked_flops, make_inputs  # benchmarks/gpu/
from qnext_jax.ops import gated_delta_rule

SHAPES = {  # name: (batch, length, key heads, value heads, head dim)
    "small": [(2, 2048, 8, 8, 64)],
    "replica": [(8, 256, 4, 8, 32)],  # configs/small.yaml at its batch and length
    "qwen3": [(1, 8192, 16, 32, 128), (4, 8192, 16, 32, 128)],
}


def ours(impl, inputs, dtype):
    q, k, v, g, beta = inputs
    args = [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(g), jnp.asarray(beta, dtype)]
    run = lambda *a: gated_delta_rule(*a, impl=impl, normalize_qk=True)[0]
    forward = jax.jit(run)
    backward = jax.jit(jax.grad(lambda *a: jnp.sum(run(*a).astype(jnp.float32)), argnums=range(5)))
    return (lambda: forward(*args).block_until_ready(),
            lambda: jax.block_until_ready(backward(*args)))


def torch_peer(function, inputs, dtype, device, repeat_heads):
    """A torch chunked function on tensors made once, outside the timed calls. repeat_heads:
    q, k repeated to the value heads (transformers' function needs it, as the HF model does);
    FLA takes grouped value heads natively and gets q, k as they are."""
    import torch

    torch_dtype = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16}[dtype]
    q, k, v, g, beta = inputs
    if repeat_heads:
        group = v.shape[2] // q.shape[2]
        q, k = np.repeat(q, group, axis=2), np.repeat(k, group, axis=2)

    def tensors(grad):
        make = lambda x, dt: torch.tensor(x, dtype=dt, device=device, requires_grad=grad)
        return [make(x, torch_dtype) for x in (q, k, v)] + [make(g, torch.float32), make(beta, torch_dtype)]

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    frozen, trainable = tensors(False), tensors(True)

    def forward():
        with torch.no_grad():
            function(*frozen)
        sync()

    def backward():
        for x in trainable:
            x.grad = None
        out = function(*trainable)[0]
        out.float().sum().backward()
        sync()

    return forward, backward


def peers(platform, inputs, dtype):
    rows = []
    if platform == "cpu":
        try:
            import torch
            from transformers.models.qwen3_next.modeling_qwen3_next import (
                torch_chunk_gated_delta_rule,
            )
        except ImportError:
            print("note: transformers/torch not installed, no CPU peer")
            return rows
        torch.set_num_threads(os.cpu_count())
        fn = lambda *a: torch_chunk_gated_delta_rule(*a, use_qk_l2norm_in_kernel=True)
        rows.append(("transformers torch_chunk_gated_delta_rule",
                     torch_peer(fn, inputs, dtype, "cpu", repeat_heads=True)))
    else:
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        except ImportError:
            print("note: flash-linear-attention not installed, no GPU peer")
            return rows
        fn = lambda *a: chunk_gated_delta_rule(*a, use_qk_l2norm_in_kernel=True)
        rows.append(("fla chunk_gated_delta_rule",
                     torch_peer(fn, inputs, dtype, "cuda", repeat_heads=False)))
    return rows


def best_times(rows, rounds):
    for _, (forward, backward) in rows:  # compile / warm up
        forward(), backward()
    best = {name: [float("inf")] * 2 for name, _ in rows}
    for _ in range(rounds):
        for name, calls in rows:
            for i, call in enumerate(calls):
                start = time.perf_counter()
                call()
                best[name][i] = min(best[name][i], time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), action="append")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    platform = jax.default_backend()
    shapes = args.shapes or (["small"] if platform == "cpu" else ["small", "qwen3"])
    dtype = getattr(jnp, args.dtype or ("float32" if platform == "cpu" else "bfloat16"))
    impls = ["chunked"] if platform == "cpu" else ["pallas", "chunked"]

    print(f"{datetime.date.today()} · device: {jax.devices()[0].device_kind} ({platform}), "
          f"jax {jax.__version__}, {dtype.__name__}, best of {args.rounds} interleaved rounds")
    print("| implementation | shape (B, T, Hk, Hv, d) | fwd ms | fwd+bwd ms | tokens/s (fwd+bwd) "
          "| fwd TFLOP/s | fwd+bwd TFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape in (s for name in shapes for s in SHAPES[name]):
        inputs = make_inputs(shape)
        rows = [(f"qnext_jax {impl}", ours(impl, inputs, dtype)) for impl in impls]
        rows += peers(platform, inputs, dtype)
        best = best_times(rows, args.rounds)
        flops_fwd, flops_bwd = chunked_flops(*shape)
        for name, (fwd, total) in best.items():
            print(f"| {name} | {shape} | {fwd * 1e3:.1f} | {total * 1e3:.1f} | "
                  f"{shape[0] * shape[1] / total:,.0f} | {flops_fwd / fwd / 1e12:.3f} | "
                  f"{(flops_fwd + flops_bwd) / total / 1e12:.3f} |")
        ours_total = best[rows[0][0]][1]
        for name, (_, total) in list(best.items())[len(impls):]:
            print(f"fwd+bwd speed-up of {rows[0][0]} over {name} at {shape}: {total / ours_total:.2f}x")


if __name__ == "__main__":
    main()
