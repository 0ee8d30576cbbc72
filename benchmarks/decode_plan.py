"""The 80B's decode step and speculative round compiled for real targets (docs/generation.md).

    python benchmarks/decode_plan.py --target h100x8 --mesh tensor=8 --batch 1 32 --depth 0 2
    python benchmarks/decode_plan.py --target v5p-8 --mesh tensor=4 --batch 1 32 --depth 0 2

For each batch and depth: memory a device from the compiler, the bytes a device must read
(qnext_jax/plan/decode.py) and their floor at the chip's bandwidth, per step and per token
(a speculative round: per token when all its drafts pass, and when none does), beside the
compiled program's bytes accessed. One line of JSON per case goes to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from qnext_jax.config import ModelConfig  # noqa: E402
from qnext_jax.plan.decode import plan_decode  # noqa: E402
from qnext_jax.plan.targets import get_target  # noqa: E402

GiB = 1024 ** 3
REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "configs" / "qwen3_next_80b_a3b.yaml"))
    parser.add_argument("--target", required=True)
    parser.add_argument("--mesh", action="append", default=[], metavar="AXIS=SIZE")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--depth", type=int, nargs="+", default=[0])
    parser.add_argument("--cache", type=int, default=32768, help="cache length (tokens a row)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layer-scan", choices=("scan", "unroll"), default="unroll",
                        help="unroll (default): XLA's cost analysis counts a loop's body once, "
                             "so only the unrolled program's bytes accessed are whole")
    parser.add_argument("--out", help="append one JSON line per case to this file")
    parser.add_argument("--hlo", help="write each case's optimised HLO into this directory")
    args = parser.parse_args(argv)
    config = ModelConfig.from_yaml(args.model).replace(dtype=args.dtype,
                                                        layer_scan=args.layer_scan)
    mesh = {name: int(size) for name, size in (m.split("=") for m in args.mesh)}
    target = get_target(args.target)
    print(f"{target.describe()}, mesh {mesh}, cache {args.cache}, {args.dtype}, layers "
          f"{args.layer_scan}", flush=True)
    for depth in args.depth:
        for batch in args.batch:
            started = time.perf_counter()
            plan = plan_decode(config, target, mesh, batch=batch, cache_length=args.cache,
                               depth=depth)
            row = _row(plan, time.perf_counter() - started, args.layer_scan)
            if args.hlo:
                Path(args.hlo).mkdir(parents=True, exist_ok=True)
                name = f"{target.name}_b{batch}_d{depth}.hlo.txt"
                (Path(args.hlo) / name).write_text(plan.compiled.hlo)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as out:
                    out.write(json.dumps(row) + "\n")
    return 0


def _row(plan, seconds: float, layer_scan: str) -> dict:
    compiled, floor = plan.compiled, plan.floor
    step_floor = plan.floor_seconds
    return {
        "target": plan.target.name, "mesh": plan.mesh, "batch": plan.batch, "rows": plan.rows,
        "cache": plan.cache_length, "depth": plan.depth,
        "arguments_gib": compiled.arguments / GiB, "temporaries_gib": compiled.temporaries / GiB,
        "code_gib": compiled.generated_code / GiB, "peak_gib": compiled.peak / GiB,
        "refused": bool(compiled.refusal),
        "read_gib": {"dense": floor.dense / GiB, "experts": floor.experts / GiB,
                     "mtp": floor.mtp / GiB, "caches": floor.caches / GiB},
        "floor_ms": 1e3 * step_floor,
        # A step gives each row 1 token; a round 1 (no draft passes) to D + 1 (all pass).
        "floor_ms_per_token_best": 1e3 * step_floor / floor.tokens_per_row,
        "compiled_bytes_gib": compiled.bytes_accessed / GiB,
        "compiled_ms": 1e3 * plan.compiled_seconds,
        "layer_scan": layer_scan, "compile_s": round(seconds, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
