"""Training throughput on CPU: our jitted train step beside `transformers`' Qwen3NextForCausalLM
(its PyTorch fallbacks for the delta rule and the experts), same model shape, batch and sequence
length, fp32, AdamW, one process each after the other on the same cores.

Ours is measured twice: as the default run trains it (with the MTP module, which transformers
does not implement), and without MTP, which is exactly the model transformers trains.

    python benchmarks/cpu_training_throughput.py                  # configs/small.yaml, 8 x 256
    python benchmarks/cpu_training_throughput.py --num-experts 16 --seq-len 512   # 16 experts

Every row also gives the model FLOP/s (ModelConfig.training_flops_per_token, forward +
backward, no recomputation) and its share of this machine's matmul peak, measured in the same
run as the best of a large fp32 matmul in jax, and the system time and minor page faults per
step (getrusage): the kernel zeroing the fresh pages of each step's temporaries.

This process sets its allocator as train.py does (qnext_jax/host_memory.py: one mapping reused
for every step's temporaries; QNEXT_JAX_KEEP_ALLOCATOR=1 measures ours without it). The peer is
timed twice: in a process of its own with glibc's stock allocator, as a transformers user runs
it, and in this process, under our allocator settings, which help PyTorch too.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


def random_rows(vocab: int, batch: int, seq_len: int, steps: int, seed: int = 0):
    """One full-length document per row: what both models see is identical."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (batch, seq_len + 1)) for _ in range(steps)]


def kernel_work() -> tuple[float, int]:
    """(system seconds, minor page faults) this process has used so far. Fresh memory is
    zeroed by the kernel on first touch: that is where a CPU step's system time goes."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_stime, usage.ru_minflt


def per_step_kernel_work(before: tuple[float, int], steps: int) -> dict:
    system, faults = kernel_work()
    return {"system_seconds_per_step": (system - before[0]) / steps,
            "minor_faults_per_step": (faults - before[1]) / steps}


def make_single_device_trainer(config, total_steps: int):
    """Our trainer on one device, AdamW as the default run's (no warmup: every step alike)."""
    import jax

    from qnext_jax.parallel.axes import ShardingRules
    from qnext_jax.parallel.mesh import MeshConfig, make_mesh
    from qnext_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
    from qnext_jax.train.step import make_trainer

    optimizer = OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=total_steps)
    rules = ShardingRules(config, make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1]))
    return make_trainer(config, make_optimizer(optimizer), learning_rate_schedule(optimizer), rules)


def dense_of_active_width(config):
    """The same model with a dense SwiGLU of the MoE's active width (top-k experts + shared) in
    every MoE's place: the FLOPs of the MoE without its routing."""
    active_width = (config.num_experts_per_tok * config.moe_intermediate_size
                    + config.shared_expert_intermediate_size)
    return config.replace(num_experts=0, intermediate_size=active_width)


def time_ours(config, batches, warmup: int) -> dict:
    import jax

    from qnext_jax.data.batch import batch_from_packed_rows

    trainer = make_single_device_trainer(config, len(batches))
    state = trainer.init()
    packed = [batch_from_packed_rows(rows, np.ones_like(rows)) for rows in batches]
    for batch in packed[:warmup]:
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    start, kernel = time.perf_counter(), kernel_work()
    for batch in packed[warmup:]:
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    steps = len(packed) - warmup
    return {"seconds_per_step": (time.perf_counter() - start) / steps,
            "last_loss": float(metrics["ce_loss"]), **per_step_kernel_work(kernel, steps)}


def time_transformers(config, batches, warmup: int, threads: int) -> dict:
    import torch
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_config = Qwen3NextConfig(**{k: v for k, v in config.to_hf().items()
                                   if k not in ("architectures", "model_type", "torch_dtype")})
    model = Qwen3NextForCausalLM(hf_config).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                  weight_decay=0.1)

    def step(rows):
        rows = torch.as_tensor(rows, dtype=torch.long)
        inputs, targets = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        out = model(input_ids=inputs, labels=targets, shift_labels=targets,
                    output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss)

    for rows in batches[:warmup]:
        step(rows)
    start, kernel = time.perf_counter(), kernel_work()
    for rows in batches[warmup:]:
        loss = step(rows)
    steps = len(batches) - warmup
    return {"seconds_per_step": (time.perf_counter() - start) / steps,
            "last_loss": loss, **per_step_kernel_work(kernel, steps), "torch": torch.__version__,
            "experts_implementation": getattr(hf_config, "_experts_implementation", None)}


def matmul_peak_flops(size: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` [size, size] x [size, size] fp32 matmuls in jax."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "small.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-experts", type=int, help="override the config's expert count")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (= cores here)")
    parser.add_argument("--dense-variant", action="store_true",
                        help="also time ours with a dense MLP of the MoE's active width in place "
                             "of the MoE (where the CPU step's time goes)")
    parser.add_argument("--peer-only", action="store_true",
                        help="time transformers alone, print its result as JSON (the stock-"
                             "allocator process the full benchmark starts)")
    return parser.parse_args(argv)


def transformers_in_stock_process(argv: list[str]) -> dict:
    """The peer timed by a fresh Python process that leaves glibc's allocator as it is (the
    --peer-only path never calls reuse_cpu_step_memory)."""
    completed = subprocess.run([sys.executable, __file__, *argv, "--peer-only"],
                               capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main():
    argv = sys.argv[1:]
    args = parse_args(argv)

    from qnext_jax.config import ModelConfig

    config = ModelConfig.from_yaml(args.config)
    if args.num_experts:
        config = config.replace(num_experts=args.num_experts)
    batches = random_rows(config.vocab_size, args.batch, args.seq_len, args.warmup + args.steps)
    no_mtp = config.replace(mtp_num_hidden_layers=0)
    if args.peer_only:
        print(json.dumps(time_transformers(no_mtp, batches, args.warmup, args.threads)))
        return
    stock_peer = transformers_in_stock_process(argv)  # first: this process's allocator changes

    from qnext_jax.host_memory import reuse_cpu_step_memory

    print(f"allocator keeps the step's memory mapped: {reuse_cpu_step_memory()}", flush=True)
    peak = matmul_peak_flops()
    print(f"matmul peak (4096^3 fp32, jax): {peak / 1e9:.1f} GFLOP/s", flush=True)
    tokens = args.batch * args.seq_len
    runs = [
        ("transformers (no MTP, own process, stock allocator)", no_mtp, lambda: stock_peer),
        ("qnext_jax (with MTP, as trained)", config,
         lambda: time_ours(config, batches, args.warmup)),
        ("qnext_jax (no MTP)", no_mtp, lambda: time_ours(no_mtp, batches, args.warmup)),
        ("transformers (no MTP, our allocator settings)", no_mtp,
         lambda: time_transformers(no_mtp, batches, args.warmup, args.threads)),
    ]
    if args.dense_variant:
        dense = dense_of_active_width(no_mtp)
        runs.append(("qnext_jax (no MTP, dense MLP for the MoE)", dense,
                     lambda: time_ours(dense, batches, args.warmup)))
    results = {}
    for name, model, run in runs:
        result = run()
        result["tokens_per_sec"] = tokens / result["seconds_per_step"]
        result["flops_per_sec"] = model.training_flops_per_token(args.seq_len) * result["tokens_per_sec"]
        results[name] = result
        print(f"{name:52s} {result['seconds_per_step']:7.2f} s/step  "
              f"{result['tokens_per_sec']:8.0f} tok/s  {result['flops_per_sec'] / 1e9:6.1f} "
              f"GFLOP/s ({result['flops_per_sec'] / peak:.0%} of peak)  "
              f"loss {result['last_loss']:.3f}  system {result['system_seconds_per_step']:.2f} "
              f"s/step, {result['minor_faults_per_step']:,.0f} page faults/step", flush=True)
    ours = results["qnext_jax (no MTP)"]["tokens_per_sec"]
    for name in ("transformers (no MTP, own process, stock allocator)",
                 "transformers (no MTP, our allocator settings)"):
        print(f"ours (no MTP) / {name}: {ours / results[name]['tokens_per_sec']:.2f}x")
    print(json.dumps({"batch": args.batch, "seq_len": args.seq_len, "num_experts": config.num_experts,
                      "matmul_peak_flops": peak, "results": results}, indent=1))


if __name__ == "__main__":
    main()
