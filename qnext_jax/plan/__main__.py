"""Compile a run's train step for a GPU or TPU target from any machine, and say whether it fits.

    python -m qnext_jax.plan RUN_CONFIG [section.key=value ...] --target NAME [--hosts N]
                             [--slices N] [--headroom 0.1] [--buffers 12]
    python -m qnext_jax.plan --list-targets

It compiles the run's own step (model, mesh, batch, micro-batches, remat, dtypes, kernels) with
the target's real compiler (XLA:GPU, or libtpu's), then prints the memory a device needs, the
buffers live at the peak with the operations that make them, the step's FLOPs and a roofline
floor on its time. Exit status: 0 when the run fits with the headroom, 1 when it does not (the
output names what would help), 2 for a bad config, target or missing compiler
(`pip install 'qnext_jax[aot]'`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qnext_jax.plan",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("run_config", nargs="?", help="a run config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as train.py takes")
    parser.add_argument("--target", help="h100, h100x8, h200, a100, b200, v5e-8, v5p-128, "
                        "v6e-256, ... (--list-targets)")
    parser.add_argument("--hosts", type=int, default=1, help="GPU hosts of eight (h100x8 ...)")
    parser.add_argument("--slices", type=int, default=1, help="TPU slices (multi-slice)")
    parser.add_argument("--headroom", type=float, default=None,
                        help="fraction of a device's memory kept free (default 0.10)")
    parser.add_argument("--buffers", type=int, default=12, help="largest buffers to list")
    parser.add_argument("--hlo", metavar="FILE",
                        help="write the compiled (optimised) program's HLO text to FILE")
    parser.add_argument("--dump", metavar="DIR",
                        help="keep the compiler's dump in DIR (buffer assignment, live ranges, "
                             "the module after every pass)")
    parser.add_argument("--list-targets", action="store_true")
    args = parser.parse_intermixed_args(argv)

    # The compile-only devices need no backend of their kind; the GPU plugin would otherwise
    # log a failed cuInit on a machine without a GPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from qnext_jax.config import ConfigError
    from qnext_jax.plan.planner import DEFAULT_HEADROOM, plan_run
    from qnext_jax.plan.report import format_plan
    from qnext_jax.plan.targets import get_target, known_targets
    from qnext_jax.train.run_config import load_run_config

    if args.list_targets:
        print("\n".join(known_targets()))
        return 0
    if args.run_config is None or args.target is None:
        parser.error("a run config and --target are required (or --list-targets)")
    if "=" in args.run_config:
        parser.error(f"the first argument is the run config file, got {args.run_config!r}")
    try:
        target = get_target(args.target, hosts=args.hosts, slices=args.slices)
        config = load_run_config(args.run_config, args.overrides)
        plan = plan_run(config, target, headroom=DEFAULT_HEADROOM if args.headroom is None
                        else args.headroom, dump=args.dump)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_plan(plan, buffers=args.buffers))
    if args.hlo:
        Path(args.hlo).expanduser().write_text(plan.compiled.hlo)
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
