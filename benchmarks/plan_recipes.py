"""Every shipped recipe compiled for the hardware it is for, by the real compilers on this
machine (`python -m qnext_jax.plan` for each), as one markdown table for docs/benchmarks.md.

    pip install -e '.[aot]'
    python benchmarks/plan_recipes.py                 # all plans (about 15 minutes on 2 cores)
    python benchmarks/plan_recipes.py --only gpu_1b   # the plans whose name contains it
    python benchmarks/plan_recipes.py --long-context  # the 80B from 4K to 262K tokens a row

Each plan runs in its own process (a compile of the 80B holds several GB of host memory).
Compile-only devices: no autotuning, so figures are memory and program structure; the floor is
a roofline bound (FLOPs at the chip's dense bf16 peak, bytes at its HBM bandwidth), not a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# (name, run config, overrides, target, hosts)
PLANS = [
    ("gpu_1b", "configs/gpu_1b.yaml", [], "h100", 1),
    ("gpu_1b, 1.5x batch", "configs/gpu_1b.yaml", ["train.batch_size=12"], "h100", 1),
    ("gpu_1b, 2x batch", "configs/gpu_1b.yaml", ["train.batch_size=16"], "h100", 1),
    ("small replica, bf16", "configs/small.yaml",
     ["model.dtype=bfloat16", "mesh.fsdp=2", "mesh.expert=4", "train.batch_size=8",
      "train.seq_len=1024"], "v5e-8", 1),
    ("small replica, bf16, remat full", "configs/small.yaml",
     ["model.dtype=bfloat16", "mesh.fsdp=2", "mesh.expert=4", "train.batch_size=8",
      "train.seq_len=1024", "model.remat_policy=full"], "v5e-8", 1),
    ("80B continued pretraining", "configs/cpt_80b_h100x64.yaml", [], "h100x8", 8),
    ("80B continued pretraining", "configs/cpt_80b_v5p128.yaml", [], "v5p-128", 1),
]


def _long(length: int, rows: int, **mesh) -> list[str]:
    """Overrides for the 80B at `rows` x `length` tokens on the given mesh (other axes 1)."""
    sizes = {"data": 1, "fsdp": 1, "expert": 1, "sequence": 1, "tensor": 1, **mesh}
    return [f"train.batch_size={rows}", f"train.seq_len={length}",
            *(f"mesh.{axis}={size}" for axis, size in sizes.items())]


# The 80B at 4,096 tokens a device (262,144 a step on 64 devices) as the row grows from 4K (the
# recipes above) to 262K tokens: rows = 64 / (the devices a row spans). docs/long_context.md.
V5P, H100 = "configs/cpt_80b_v5p128.yaml", "configs/cpt_80b_h100x64.yaml"
LONG_CONTEXT = [
    ("80B 32K, fsdp 8 x sequence 8", V5P, _long(32768, 8, fsdp=8, sequence=8), "v5p-128", 1),
    ("80B 32K, expert 8 x sequence 8", V5P, _long(32768, 8, expert=8, sequence=8), "v5p-128", 1),
    ("80B 262K, sequence 64", V5P, _long(262144, 1, sequence=64), "v5p-128", 1),
    ("80B 128K, fsdp 2 x sequence 32", V5P, _long(131072, 2, fsdp=2, sequence=32), "v5p-128", 1),
    ("80B 32K, expert 8 x sequence 8", H100, _long(32768, 8, expert=8, sequence=8), "h100x8", 8),
    ("80B 128K, fsdp 2 x sequence 32", H100, _long(131072, 2, fsdp=2, sequence=32), "h100x8", 8),
    ("80B 262K, sequence 64", H100, _long(262144, 1, sequence=64), "h100x8", 8),
]


def run_plan(config: str, overrides: list[str], target: str, hosts: int) -> dict:
    """One plan in a child process; its row as a dict."""
    code = (
        "import json, sys\n"
        "from qnext_jax.plan.planner import plan_run\n"
        "from qnext_jax.plan.report import format_plan, plan_row\n"
        "from qnext_jax.plan.targets import get_target\n"
        "from qnext_jax.train.run_config import load_run_config\n"
        "config, target, hosts, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]\n"
        "plan = plan_run(load_run_config(config, overrides), get_target(target, hosts=hosts))\n"
        "print(format_plan(plan), file=sys.stderr)\n"
        "print(json.dumps(plan_row(plan)))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code, config, target, str(hosts), *overrides],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    report = "\n".join(line for line in result.stderr.splitlines()
                       if not line.startswith(("WARNING", "W1", "E0", "I0", "  File", "To avoid")))
    if result.returncode:
        return {"error": report[-3000:]}
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row["report"] = report[report.find("target "):]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the plans whose name contains this")
    parser.add_argument("--reports", action="store_true", help="print each plan's full report")
    parser.add_argument("--long-context", action="store_true",
                        help="the 80B from 4K to 262K tokens a row (docs/long_context.md) "
                             "instead of the recipes")
    args = parser.parse_args()
    rows = []
    for name, config, overrides, target, hosts in LONG_CONTEXT if args.long_context else PLANS:
        if args.only and args.only not in name:
            continue
        row = {"plan": name, **run_plan(config, overrides, target, hosts)}
        rows.append(row)
        if "error" in row:
            print(f"{name} on {target}: FAILED\n{row['error']}", flush=True)
            continue
        if args.reports:
            print(f"\n## {name}\n{row['report']}\n", flush=True)
        print(f"{name} on {row['target']}: peak {row['peak_gib']:.2f} GiB of "
              f"{row['device_gib']:.1f}, compiled in {row['compile_s']:.0f} s", flush=True)
    columns = ["target", "mesh", "batch", "arguments_gib", "temporaries_gib", "peak_gib",
               "device_gib", "fits", "floor_ms", "compile_s", "largest"]
    print("\n| plan | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for row in rows:
        if "error" in row:
            print(f"| {row['plan']} | failed |")
            continue
        cells = [f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print(f"| {row['plan']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
