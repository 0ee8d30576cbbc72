"""Per-device memory of the Qwen3-Next-80B-A3B train step on large meshes, from one CPU machine.

For each mesh it prints the bytes per device of the parameters and the AdamW state (from the
shardings the logical-axis table gives), and XLA's own estimate for the compiled step
(arguments, outputs, temporaries) — compiled for `N` virtual CPU devices, since the devices of
a real pod are not here. The CPU compiler's temporaries are an estimate of the activation
memory, not a TPU/GPU number: their schedulers and fusions differ.

    python benchmarks/plan_80b_memory.py                      # 64 and 128 devices
    python benchmarks/plan_80b_memory.py --mesh 128:fsdp=16,expert=8 --no-compile
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MESHES = ["64:fsdp=8,expert=8", "128:fsdp=16,expert=8", "128:fsdp=8,expert=16"]
GiB = 1024 ** 3


def parse_mesh(text: str):
    devices, axes = text.split(":")
    sizes = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    for part in axes.split(","):
        name, value = part.split("=")
        sizes[name] = int(value)
    return int(devices), sizes


def measure(mesh_text: str, args) -> dict:
    """Runs in a subprocess that has `devices` virtual CPU devices."""

    from qnext_jax.config import ModelConfig
    from qnext_jax.parallel.mesh import MeshConfig, batch_shards, make_mesh
    from qnext_jax.plan.trace import lower_train_step, planned_trainer, state_bytes_per_device

    devices, sizes = parse_mesh(mesh_text)
    config = ModelConfig.from_yaml(REPO_ROOT / "configs" / "qwen3_next_80b_a3b.yaml").replace(
        remat_policy=args.remat)
    mesh_config = MeshConfig(**sizes)
    mesh = make_mesh(mesh_config) if args.compile else None
    trainer = planned_trainer(config, mesh_config, devices, mesh=mesh)
    shards = batch_shards(trainer.batch_sharding.mesh)
    global_batch = shards * args.sequences_per_device
    row = {"mesh": mesh_text, "global_batch": global_batch, "seq_len": args.seq_len}
    row.update({f"{k}_gib": v / GiB for k, v in state_bytes_per_device(trainer).items()})
    start = time.time()
    lowered = lower_train_step(trainer, global_batch, args.seq_len,
                               platform=None if args.compile else "tpu")
    row["lower_s"] = time.time() - start
    if args.compile:
        start = time.time()
        memory = lowered.compile().memory_analysis()
        row["compile_s"] = time.time() - start
        for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
            row[field.replace("_size_in_bytes", "_gib")] = getattr(memory, field) / GiB
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", action="append", help="DEVICES:axis=size,... (repeatable)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--sequences-per-device", type=int, default=1,
                        help="rows per batch shard (data*fsdp*expert)")
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="lower only (for TPU), skip XLA's memory estimate")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    rows = []
    for mesh_text in args.mesh or DEFAULT_MESHES:
        devices, _ = parse_mesh(mesh_text)
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_PLATFORMS="cpu")
        command = [sys.executable, __file__, "--child", mesh_text, "--seq-len", str(args.seq_len),
                   "--sequences-per-device", str(args.sequences_per_device), "--remat", args.remat]
        if not args.compile:
            command.append("--no-compile")
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"{mesh_text} failed:\n{result.stderr[-4000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    columns = [c for c in rows[0] if c != "mesh"]
    print("\n| mesh | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for row in rows:
        cells = [f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print(f"| {row['mesh']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
