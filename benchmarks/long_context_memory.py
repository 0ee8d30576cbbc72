"""Per-device activation memory of the train step against sequence length, with the sequence split.

Measured: XLA's `memory_analysis()` of the compiled train step of the small replica
(configs/small.yaml) with one row of T tokens on 8 virtual CPU devices, `mesh.sequence=8`, for
T = 2K, 8K, 32K — with this framework's paths (blockwise attention, fused head + loss) and, as
the peer, the plain ones they replace (XLA attention with a [T, T] mask, full logits).
Temporaries are XLA:CPU's buffer assignment: an estimate of activation memory, not a GPU/TPU
number (their fusions and schedules differ).

Analytic: `activation_bytes()` adds up the tensors a step keeps per device (named below), is
checked against the measured small cases, then evaluated for Qwen3-Next-80B-A3B at 32K, 128K
and 262K tokens on 64-256 devices.

    python benchmarks/long_context_memory.py              # measured + analytic (~10 min, 2 cores)
    python benchmarks/long_context_memory.py --analytic-only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB, GiB = 1024 ** 2, 1024 ** 3
DEVICES = 8
LENGTHS = (2048, 8192, 32768)
VARIANTS = {
    "ours": {},
    "plain attention + logits": {"attention_impl": "xla", "fused_head": False},
}


def measure(length: int, variant: str, remat: str) -> dict:
    """Runs in a subprocess with DEVICES virtual CPU devices."""
    import jax

    from qnext_jax.config import ModelConfig
    from qnext_jax.parallel.axes import ShardingRules
    from qnext_jax.parallel.mesh import MeshConfig, make_mesh
    from qnext_jax.train.losses import LossConfig
    from qnext_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
    from qnext_jax.plan.trace import lower_train_step
    from qnext_jax.train.step import make_trainer

    options = VARIANTS[variant]
    config = ModelConfig.from_yaml(REPO_ROOT / "configs" / "small.yaml").replace(
        remat_policy=remat, attention_impl=options.get("attention_impl", "auto"))
    loss = LossConfig(fused_head=options.get("fused_head", True))
    mesh = make_mesh(MeshConfig(fsdp=1, sequence=DEVICES))
    optimizer = OptimizerConfig()
    trainer = make_trainer(config, make_optimizer(optimizer), learning_rate_schedule(optimizer),
                           ShardingRules(config, mesh), loss_config=loss)
    memory = lower_train_step(trainer, 1, length, platform=None).compile().memory_analysis()
    assert jax.device_count() == DEVICES
    return {"temp": memory.temp_size_in_bytes, "arguments": memory.argument_size_in_bytes}


def activation_bytes(config, *, rows: int, length: int, sequence: int, tensor: int = 1,
                     expert: int = 1, remat: str, cpu_tiled_experts: bool = False
                     ) -> float:
    """Bytes of temporaries one device holds in the train step: `rows` rows of `length` tokens
    split over `sequence` shards, heads over `tensor`, experts over `expert` (dropless).

    Per token and layer, the forward tensors the backward pass reads (c: compute-dtype bytes):
      every layer   two norm outputs and the residual update: 3E c
      DeltaNet      q, k, v, z projections, conv outputs before/after SiLU, the rule's fp32
                    normalised q/k and WY terms (w, u), its output, the gated norm; with the
                    sequence split, the first pass's terms again with dk more value columns
      attention     q, gate, k, v, their normed/rotated forms, the output and its gate;
                    plus the row's gathered keys and values (length tokens, not length/P)
      MoE           router logits and probabilities (fp32), the dispatch buffers (a token
                    rides to every expert shard when dropless: S rows out and back), the
                    grouped rows and the experts' gate/up/down activations (k choices), the
                    shared expert's; on XLA:CPU (`cpu_tiled_experts`) also the tiled grouped
                    matmul's per-tile copies of the expert weights and their gradients
    The backward of a layer holds its forward tensors and as many cotangents (x2). remat
    "full" keeps every layer's input and recomputes one layer at a time; "none" keeps every
    layer's forward tensors. Also one chunk of the fused loss (logits, probabilities,
    gradient). Not included: the parameter-sized temporaries (gradients, the optimizer's
    update), see `parameter_temporaries`.
    """
    c = 2 if config.dtype in ("bfloat16", "float16") else 4
    f = 4
    tokens = rows * length // sequence
    hidden = config.hidden_size
    hk, hv = config.linear_num_key_heads // tensor, config.linear_num_value_heads // tensor
    dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
    n, kv, d = (config.num_attention_heads // tensor,
                max(config.num_key_value_heads // tensor, 1), config.head_dim)
    qk, vz = 2 * hk * dk, 2 * hv * dv
    deltanet = (qk + vz) * c + 2 * (qk + hv * dv) * c + (qk + hv * (dk + dv)) * f \
        + 3 * hv * dv * c + 4 * hv * f
    if sequence > 1:
        deltanet += (qk + hv * (2 * dk + dv)) * f
    attention = (2 * n * d + 2 * kv * d) * c * 2 + 2 * n * d * c + n * f
    gathered_kv = rows * length * 2 * kv * d * c if sequence > 1 else 0
    shards, top_k = expert, config.num_experts_per_tok
    width = config.moe_intermediate_size // tensor
    moe = 2 * config.num_experts * f + 4 * shards * hidden * c \
        + shards * top_k * (2 * hidden + 3 * width) * c \
        + (3 * config.shared_expert_intermediate_size // tensor + hidden) * c
    tile_copies = 0
    if cpu_tiled_experts and config.num_experts:
        local_experts = config.num_experts // expert
        tiles = (tokens * shards * top_k + local_experts * 63) / 64
        tile_copies = 2 * 3 * tiles * hidden * width * c
    common = 3 * hidden * c

    def layer(mixer, uses_moe):  # (per-token bytes, per-layer bytes)
        mlp = moe if uses_moe else 3 * config.intermediate_size // tensor * c
        per_token = common + mlp + (deltanet if mixer == "linear_attention" else attention)
        fixed = (tile_copies if uses_moe else 0) + (gathered_kv if mixer != "linear_attention" else 0)
        return tokens * per_token + fixed

    layers = [layer(m, moe) for m, moe in config.layer_pattern]
    if config.mtp_num_hidden_layers:
        layers += [layer("full_attention", config.mtp_uses_moe)] * (
            config.mtp_num_hidden_layers * config.mtp_depth)
    if remat == "full":
        held = len(layers) * tokens * hidden * c + 2 * max(layers)
    else:
        held = sum(layers) + max(layers)
    vocab = config.vocab_size // tensor
    chunk = min(max(256, 1 << ((1 << 24) // vocab).bit_length() - 1), tokens)
    loss = 3 * chunk * vocab * f + tokens * (hidden * c + 2 * f) * (1 + config.mtp_depth)
    return held + loss


def parameter_temporaries(config) -> float:
    """The gradients and the optimizer's update of replicated fp32 parameters: 2 x 4 B each."""
    return 2 * 4 * config.param_counts()["total"]


def analytic_80b_rows():
    from qnext_jax.config import ModelConfig

    config = ModelConfig.from_yaml(REPO_ROOT / "configs" / "qwen3_next_80b_a3b.yaml")
    rows = []
    # fsdp x expert shard the parameters and take one row each; sequence splits the rows.
    for devices, fsdp, expert, sequence in ((64, 1, 8, 8), (128, 1, 8, 16), (256, 2, 8, 16),
                                            (256, 1, 8, 32)):
        for length in (32768, 131072, 262144):
            rows.append({
                "devices": devices, "mesh": f"fsdp={fsdp},expert={expert},sequence={sequence}",
                "T": length, "tokens/device": length // sequence,
                "activations_gib": activation_bytes(
                    config, rows=1, length=length, sequence=sequence, expert=expert,
                    remat="full") / GiB,
            })
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--analytic-only", action="store_true")
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(int(args.child[0]), args.child[1], args.remat)))
        return

    from qnext_jax.config import ModelConfig

    small = ModelConfig.from_yaml(REPO_ROOT / "configs" / "small.yaml")
    if not args.analytic_only:
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
        print(f"small replica, 1 row, mesh.sequence={DEVICES}, remat={args.remat}: "
              "per-device MiB (XLA:CPU temporaries; analytic model)\n")
        print("| T | tokens/device | ours | plain attention + logits | analytic (ours) | "
              "measured / analytic |")
        print("|---|---|---|---|---|---|")
        for length in LENGTHS:
            cells = []
            for variant in VARIANTS:
                command = [sys.executable, __file__, "--child", str(length), variant,
                           "--remat", args.remat]
                result = subprocess.run(command, env=env, capture_output=True, text=True)
                if result.returncode:
                    sys.exit(f"T={length} {variant} failed:\n{result.stderr[-4000:]}")
                cells.append(json.loads(result.stdout.strip().splitlines()[-1])["temp"] / MiB)
            model = (activation_bytes(small, rows=1, length=length, sequence=DEVICES,
                                      remat=args.remat, cpu_tiled_experts=True)
                     + parameter_temporaries(small)) / MiB
            print(f"| {length} | {length // DEVICES} | {cells[0]:.1f} | {cells[1]:.1f} | "
                  f"{model:.1f} | {cells[0] / model:.2f} |", flush=True)
    print("\nQwen3-Next-80B-A3B, bf16, remat=full, one row per fsdp x expert shard: analytic "
          "activation GiB per device (parameters and optimizer state: plan_80b_memory.py)\n")
    print("| devices | mesh | T | tokens/device | activations GiB |")
    print("|---|---|---|---|---|")
    for row in analytic_80b_rows():
        print(f"| {row['devices']} | {row['mesh']} | {row['T']} | {row['tokens/device']} | "
              f"{row['activations_gib']:.1f} |")


if __name__ == "__main__":
    main()
