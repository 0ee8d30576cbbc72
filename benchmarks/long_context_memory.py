"""Per-device activation memory of the train step against sequence length, with the sequence split.

Measured: XLA's `memory_analysis()` of the compiled train step of the small replica
(configs/small.yaml) with one row of T tokens on 8 virtual CPU devices, `mesh.sequence=8`, for
T = 2K, 8K, 32K — with this framework's paths (blockwise attention, fused head + loss) and, as
the peer, the plain ones they replace (XLA attention with a [T, T] mask, full logits).
Temporaries are XLA:CPU's buffer assignment: an estimate of activation memory, not a GPU/TPU
number (their fusions and schedules differ).

The analytic activation model this script once held is retired: the real compilers put the
80B's long-context layouts at up to 20x its figures (docs/benchmarks.md, "Plans"). Memory on a
GPU or TPU comes from `python -m qnext_jax.plan`.

    python benchmarks/long_context_memory.py              # ~10 min, 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 ** 2
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(int(args.child[0]), args.child[1], args.remat)))
        return

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    print(f"small replica, 1 row, mesh.sequence={DEVICES}, remat={args.remat}: "
          "per-device MiB (XLA:CPU temporaries)\n")
    print("| T | tokens/device | ours | plain attention + logits |")
    print("|---|---|---|---|")
    for length in LENGTHS:
        cells = []
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--child", str(length), variant,
                       "--remat", args.remat]
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"T={length} {variant} failed:\n{result.stderr[-4000:]}")
            cells.append(json.loads(result.stdout.strip().splitlines()[-1])["temp"] / MiB)
        print(f"| {length} | {length // DEVICES} | {cells[0]:.1f} | {cells[1]:.1f} |", flush=True)

if __name__ == "__main__":
    main()
