"""Run a named study (or all of them) and write its table and plots.

    python -m qnext_jax.experiments NAME [--out DIR] [--seeds 0,1] [--set section.key=value ...]
    python -m qnext_jax.experiments --list

NAME is one of the studies in qnext_jax/experiments/studies.py, or `all`. Runs go to
DIR/NAME/RUN (default runs/experiments); a study started again skips its finished runs and
resumes a cut-short one from its checkpoint. `--set` changes every run of the study alike.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m qnext_jax.experiments",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help="a study, or 'all'")
    parser.add_argument("--out", type=Path, default=Path("runs/experiments"))
    parser.add_argument("--seeds", help="comma-separated seeds (default: the study's own)")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides",
                        help="section.key=value for every run")
    parser.add_argument("--list", action="store_true", help="list the studies")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from qnext_jax.experiments.studies import STUDIES

    if args.list or not args.name:
        for study in STUDIES.values():
            print(f"{study.name:12s} {len(study.variants)} variants x {len(study.seeds)} seeds: "
                  f"{study.question}")
        return 0 if args.list else 2
    names = list(STUDIES) if args.name == "all" else [args.name]
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        print(f"error: no study {unknown[0]!r}; the studies are {sorted(STUDIES)}", file=sys.stderr)
        return 2
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None

    from qnext_jax.host_memory import reuse_cpu_step_memory

    reuse_cpu_step_memory()  # before JAX starts its backends, as train.py does
    import jax

    # The runs of a study compile the same steps (seeds, initialisations and most switches
    # leave the step's program unchanged): a persistent cache under the output folder compiles
    # each program once per study instead of once per run. A cache the user set is kept.
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(args.out.resolve() / "compilation_cache"))
    from qnext_jax.config import ConfigError
    from qnext_jax.experiments.runner import StudyStopped, run_study
    from qnext_jax.train.loop import TrainingError

    try:
        for name in names:
            run_study(STUDIES[name], args.out / name, tuple(args.overrides), seeds)
    except (ConfigError, TrainingError, StudyStopped) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
