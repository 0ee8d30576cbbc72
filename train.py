"""Train a Qwen3-Next-architecture model.

    python train.py [CONFIG.yaml] [section.key=value ...]

With no arguments: the default run, configs/small.yaml (the small replica pretrained on the
embedded corpus: the Python standard library's sources and documentation), on whatever devices
JAX sees. Overrides apply on top of it (or of CONFIG.yaml).
`python train.py --help` lists every key with its default.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_RUN = Path(__file__).resolve().parent / "configs" / "small.yaml"


def usage() -> str:
    from qnext_jax.train.run_config import all_keys

    lines = [__doc__.strip(), "", f"keys (the values of the default run, {DEFAULT_RUN.name}):"]
    for key, default in all_keys(DEFAULT_RUN).items():
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
    from qnext_jax.host_memory import reuse_cpu_step_memory

    reuse_cpu_step_memory()  # also before: it sets how the CPU client dispatches

    import jax

    from qnext_jax.config import ConfigError
    from qnext_jax.train.loop import TrainingError, train
    from qnext_jax.train.run_config import load_run_config
    from qnext_jax.train.run_dir import new_run_dir

    try:
        # The default run, unless a config file or a Hugging Face checkpoint
        # (train.init_from_hf, which defines the model) says otherwise.
        from_hf = any(arg.startswith("train.init_from_hf=") for arg in overrides)
        if config_path is None and not from_hf:
            config_path = DEFAULT_RUN
        config = load_run_config(config_path, overrides)
        named = config.train.run_dir is not None
        run_dir = Path(config.train.run_dir).expanduser() if named else new_run_dir()
        is_main = jax.process_index() == 0
        if is_main:
            print(f"run_dir: {run_dir}")
        try:
            last, _ = train(config, run_dir)  # leaves nothing in run_dir if it never trained
        except BaseException:
            if not named and is_main and run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()  # the folder new_run_dir made for it
            raise
    except (ConfigError, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if last and is_main:
        summary = f"step {last['step']}, loss {last['loss']:.4f}" + (
            f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else "")
        if last["step"] < config.train.steps:
            again = "the same command" + ("" if named else f" with train.run_dir={run_dir}")
            print(f"stopped before the end: {summary}; to resume, run {again}")
        else:
            print(f"done: {summary}")
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
