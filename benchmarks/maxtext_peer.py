"""The 80B on a TPU v5p-128 compiled by MaxText and by us on the same jax and libtpu, side by side:
memory a chip from each program's own compiler at 4K, 32K, 128K and 262K tokens a row (4,096
tokens a chip). Results: docs/long_context.md.

    # a Python 3.12 environment with MaxText's TPU dependencies and this project:
    python3.12 -m venv /tmp/mtv && /tmp/mtv/bin/pip install "maxtext[tpu]==0.2.5" \\
        "jax==0.12.0.1" "jaxlib==0.12.0.1" "libtpu==0.0.52" && /tmp/mtv/bin/pip install --no-deps -e .
    /tmp/mtv/bin/python benchmarks/maxtext_peer.py                 # every length (hours on 2 cores)
    /tmp/mtv/bin/python benchmarks/maxtext_peer.py --only 4K --side ours

MaxText runs its own `train_compile` with its defaults for the 80B (fp32 weights and AdamW,
bf16 compute, MTP and the load-balancing loss off) and `remat_policy=full`, on the layout that
matches ours (its `context` axis is our `sequence`; it needs `allow_split_physical_axes` for
these meshes and `context_parallel_load_balance=False` for the context layouts). Ours is
`python -m qnext_jax.plan` on `configs/cpt_80b_v5p128.yaml` (MTP and the global balancing loss
on). Each compile runs in its own process, one at a time (an 80B compile holds 4-16 GB).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GIB = 2 ** 30

# (name, rows, row length, our mesh, MaxText's parallelism)
CASES = [
    ("4K", 64, 4096, dict(fsdp=8, expert=8), dict(ici_fsdp_parallelism=8, ici_expert_parallelism=8)),
    ("32K", 8, 32768, dict(fsdp=8, sequence=8),
     dict(ici_fsdp_parallelism=8, ici_context_parallelism=8)),
    ("128K", 2, 131072, dict(fsdp=2, sequence=32),
     dict(ici_fsdp_parallelism=2, ici_context_parallelism=32)),
    ("262K", 1, 262144, dict(sequence=64), dict(ici_context_parallelism=64)),
]


def env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
                TPU_SKIP_MDS_QUERY="1")


def maxtext(rows: int, length: int, parallelism: dict) -> dict:
    import maxtext

    base = Path(maxtext.__file__).parent / "configs" / "base.yml"
    context = parallelism.get("ici_context_parallelism", 1) > 1
    args = [sys.executable, "-m", "maxtext.trainers.pre_train.train_compile", str(base),
            "compile_topology=v5p-128", "compile_topology_num_slices=1",
            "model_name=qwen3-next-80b-a3b", "remat_policy=full", "dataset_type=synthetic",
            "base_output_directory=/tmp/maxtext_peer", "run_name=peer",
            f"per_device_batch_size={rows / 64}", f"max_target_length={length}",
            "allow_split_physical_axes=True",
            *(f"{k}={v}" for k, v in parallelism.items()),
            *(["context_parallel_load_balance=False"] if context else [])]
    out = subprocess.run(args, env=env(), capture_output=True, text=True)
    found = re.search(r"Memory analysis: CompiledMemoryStats\(([^)]*)\)", out.stdout + out.stderr)
    if not found:
        return {"error": (out.stdout + out.stderr)[-2000:]}
    stats = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", found.group(1))}
    return _gib(stats["argument_size_in_bytes"], stats["temp_size_in_bytes"],
                stats["generated_code_size_in_bytes"],
                stats["output_size_in_bytes"] - stats["alias_size_in_bytes"])


def ours(rows: int, length: int, mesh: dict) -> dict:
    sizes = {"data": 1, "fsdp": 1, "expert": 1, "sequence": 1, "tensor": 1, **mesh}
    args = [sys.executable, "-m", "qnext_jax.plan", "configs/cpt_80b_v5p128.yaml",
            "--target", "v5p-128", f"train.batch_size={rows}", f"train.seq_len={length}",
            *(f"mesh.{axis}={size}" for axis, size in sizes.items())]
    out = subprocess.run(args, cwd=REPO_ROOT, env=env(), capture_output=True, text=True)
    figures = {}
    for name in ("arguments", "temporaries", "code"):
        found = re.search(rf"^\s+{name}\s+([\d.]+) GiB", out.stdout, re.M)
        if found:
            figures[name] = float(found.group(1))
    unaliased = re.search(r"outputs\s+([\d.]+) GiB\s+\(([\d.]+) GiB of them reuse", out.stdout)
    if len(figures) < 3 or not unaliased:
        return {"error": (out.stdout + out.stderr)[-2000:]}
    extra = (float(unaliased.group(1)) - float(unaliased.group(2))) * GIB
    return _gib(figures["arguments"] * GIB, figures["temporaries"] * GIB, figures["code"] * GIB,
                extra)


def _gib(arguments, temporaries, code, unaliased_outputs) -> dict:
    return {"arguments": arguments / GIB, "temporaries": temporaries / GIB,
            "peak": (arguments + temporaries + code + unaliased_outputs) / GIB}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="the case to run (4K, 32K, 128K, 262K)")
    parser.add_argument("--side", choices=("both", "ours", "maxtext"), default="both")
    args = parser.parse_args()
    import jax
    import libtpu  # noqa: F401  (MaxText's compile and ours both need the TPU compiler)
    from importlib.metadata import version

    print(f"jax {jax.__version__}, libtpu {version('libtpu')}", flush=True)
    print("| row | layout | ours: arguments / temporaries / peak GiB | "
          "MaxText: arguments / temporaries / peak GiB |\n|---|---|---|---|", flush=True)
    for name, rows, length, mesh, parallelism in CASES:
        if args.only and args.only != name:
            continue
        cells = []
        for side, run in (("ours", lambda: ours(rows, length, mesh)),
                          ("maxtext", lambda: maxtext(rows, length, parallelism))):
            if args.side not in ("both", side):
                cells.append("—")
                continue
            figures = run()
            cells.append(f"failed: {figures['error'][-300:]!r}" if "error" in figures else
                         f"{figures['arguments']:.2f} / {figures['temporaries']:.2f} / "
                         f"**{figures['peak']:.2f}**")
        layout = " × ".join(f"{axis} {size}" for axis, size in mesh.items())
        print(f"| {rows} × {length:,} | {layout} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
