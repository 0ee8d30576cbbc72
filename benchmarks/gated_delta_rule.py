"""Gated delta rule speed: our implementations side by side with a peer, in one run.

CPU peer: transformers' `torch_chunk_gated_delta_rule` (the fallback HF runs without FLA), same
inputs, forward and forward+backward. Prints a table; record results in docs/benchmarks.md.

    python benchmarks/gated_delta_rule.py                 # CPU default: B=2, T=2048, 8 heads, d=64
    python benchmarks/gated_delta_rule.py --batch 1 --length 4096 --heads 4
"""

import argparse
import os
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qnext_jax.ops import gated_delta_rule  # noqa: E402


def chunked_flops(batch, length, heads, key_dim, value_dim, chunk=64):
    """FLOPs of the chunked algorithm's forward (the work it does, not the naive recurrence)."""
    chunks = -(-length // chunk)
    per_chunk = (
        2 * chunk * chunk * key_dim  # K K^T
        + 2 * chunk * chunk * key_dim  # Q K^T
        + chunk * chunk * (value_dim + key_dim)  # triangular solves for U and W
        + 2 * chunk * key_dim * value_dim * 3  # W S, Q S, K^T U
        + 2 * chunk * chunk * value_dim  # (QK^T * Gamma) U
    )
    return batch * heads * chunks * per_chunk


def time_call(fn, repeats):
    fn()  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=64)
    args = parser.parse_args()
    b, t, h, d = args.batch, args.length, args.heads, args.dim
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, b, t, h, d)).astype(np.float32)
    v = rng.normal(size=(b, t, h, d)).astype(np.float32)
    g = -rng.uniform(0.01, 1.0, size=(b, t, h)).astype(np.float32)
    beta = rng.uniform(0, 1, size=(b, t, h)).astype(np.float32)
    rows = []

    args_jax = [jnp.asarray(x) for x in (q, k, v, g, beta)]
    for impl in ("chunked",):
        forward = jax.jit(lambda *a: gated_delta_rule(*a, impl=impl, normalize_qk=True, chunk_size=args.chunk)[0])
        loss = lambda *a: jnp.sum(gated_delta_rule(*a, impl=impl, normalize_qk=True, chunk_size=args.chunk)[0])
        backward = jax.jit(jax.grad(loss, argnums=range(5)))
        fwd = time_call(lambda: forward(*args_jax).block_until_ready(), args.repeats)
        bwd = time_call(lambda: jax.block_until_ready(backward(*args_jax)), args.repeats)
        rows.append((f"qnext_jax {impl}", fwd, bwd))

    try:
        import torch
        from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(os.cpu_count())

        def torch_inputs(grad):
            return [torch.tensor(x, requires_grad=grad) for x in (q, k, v, g, beta)]

        def torch_forward():
            with torch.no_grad():
                torch_chunk_gated_delta_rule(*torch_inputs(False), use_qk_l2norm_in_kernel=True)

        def torch_backward():
            inputs = torch_inputs(True)
            out, _ = torch_chunk_gated_delta_rule(*inputs, use_qk_l2norm_in_kernel=True)
            out.sum().backward()

        rows.append(("transformers torch_chunk_gated_delta_rule",
                     time_call(torch_forward, args.repeats), time_call(torch_backward, args.repeats)))

    flops = chunked_flops(b, t, h, d, d)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"shape: B={b} T={t} H={h} dk=dv={d}, fp32, {args.repeats} repeats (best)")
    print("| implementation | fwd ms | fwd+bwd ms | tokens/s (fwd+bwd) | fwd GFLOP/s |")
    print("| --- | --- | --- | --- | --- |")
    for name, fwd, bwd in rows:
        print(f"| {name} | {fwd * 1e3:.1f} | {bwd * 1e3:.1f} | {b * t / bwd:,.0f} | {flops / fwd / 1e9:.2f} |")
    if len(rows) == 2:
        print(f"fwd+bwd speed-up of qnext_jax chunked over transformers: {rows[1][2] / rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
