"""Train a Qwen3-Next-architecture model.

    python train.py [CONFIG.yaml] [section.key=value ...]

With no arguments: the small replica (configs/small.yaml) on the embedded default corpus (the
Python standard library's sources and documentation), on whatever devices JAX sees.
`python train.py --help` lists every key with its default.
"""

from __future__ import annotations

import sys
from pathlib import Path

PRESET = Path(__file__).resolve().parent / "configs" / "small.yaml"
DEFAULTS = [f"model.preset={PRESET}"]


def usage() -> str:
    from qnext_jax.train.run_config import all_keys

    lines = [__doc__.strip(), "", "keys (default, with no CONFIG.yaml):"]
    for key, default in all_keys(PRESET).items():
        lines.append(f"  {key} = {default!r}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage())
        return 0
    config_path = argv[0] if argv and not argv[0].count("=") else None
    overrides = argv[1:] if config_path else argv

    from qnext_jax.parallel.distributed import initialize_from_env

    initialize_from_env()  # before anything touches the devices

    from qnext_jax.config import ConfigError
    from qnext_jax.train.loop import TrainingError, new_run_dir, train
    from qnext_jax.train.run_config import load_run_config

    try:
        # The small preset is the default model, unless a config file or a Hugging Face
        # checkpoint (train.init_from_hf) says what the model is.
        from_hf = any(arg.startswith("train.init_from_hf=") for arg in overrides)
        defaults = [] if config_path or from_hf else DEFAULTS
        config = load_run_config(config_path, defaults + overrides)
        run_dir = Path(config.train.run_dir) if config.train.run_dir else new_run_dir()
        print(f"run_dir: {run_dir}")
        last, _ = train(config, run_dir)
    except (ConfigError, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if last:
        print(f"done: step {last['step']}, loss {last['loss']:.4f}"
              + (f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
