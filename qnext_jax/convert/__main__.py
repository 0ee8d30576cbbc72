"""Command line: convert between Hugging Face Qwen3-Next checkpoints and qnext_jax.

    python -m qnext_jax.convert check  HF_DIR            # validate every tensor name and shape
    python -m qnext_jax.convert reshard HF_DIR OUT_DIR   # load into qnext_jax, write back (HF layout)
    python -m qnext_jax.convert export RUN_DIR [--step N] [--out DIR]
                                                         # a run's checkpoint as a HF directory
"""

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp

from qnext_jax.config import ConfigError
from qnext_jax.convert.load import load_hf_checkpoint, match_rules, read_hf_config
from qnext_jax.convert.safetensors_dir import CheckpointError, SafetensorsDir
from qnext_jax.convert.save import save_hf_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qnext_jax.convert",
        description="Hugging Face Qwen3-Next safetensors <-> qnext_jax parameters (streaming).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a HF directory against its config.json "
                                "(every tensor present, no extra ones, shapes right); loads nothing")
    check.add_argument("hf_dir")
    reshard = commands.add_parser("reshard", help="load a HF directory into the qnext_jax model and "
                                  "write it back as a HF directory (per-expert layout, new shards)")
    reshard.add_argument("hf_dir")
    reshard.add_argument("out_dir")
    reshard.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                         help="parameter dtype of the loaded model and of the written tensors")
    reshard.add_argument("--max-shard-gb", type=float, default=2.0)
    reshard.add_argument("--mesh", action="append", default=[], metavar="AXIS=SIZE",
                         help="read the parameters onto a mesh of the devices (data, tensor, "
                              "expert; as generation places them), each tensor into its shards, "
                              "instead of onto one device (the 80B in bf16 needs 160 GB)")
    export = commands.add_parser("export", help="write a training run's checkpoint (the latest, "
                                 "or --step) as a HF directory with its tokenizer files")
    export.add_argument("run_dir")
    export.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
    export.add_argument("--out", help="the HF directory to write (default: RUN_DIR/hf-step<N>)")
    export.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="default: train.export_dtype of the run, else its compute dtype")
    export.add_argument("--max-shard-gb", type=float, default=2.0)
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            from qnext_jax.train.export import export_run_checkpoint

            out = export_run_checkpoint(args.run_dir, args.step, args.out, args.dtype,
                                        int(args.max_shard_gb * (1 << 30)))
            print(f"wrote {out}")
            return 0
        files = SafetensorsDir(_absolute(args.hf_dir))
        if args.command == "check":
            config = read_hf_config(args.hf_dir, files, jnp.float32)
            rules = match_rules(config, files)
            counts = config.param_counts()
            dtypes = sorted({files.dtype(rule.hf_name) for rule in rules})
            print(f"{args.hf_dir}: {len(rules)} tensors ({', '.join(dtypes)}) match the config; "
                  f"{counts['main']:,} parameters + {counts['mtp']:,} in MTP")
            return 0
        shardings = None
        if args.mesh:
            from qnext_jax.generate.sharding import generation_mesh, mesh_sizes, shardings_by_path

            config = read_hf_config(args.hf_dir, files, getattr(jnp, args.dtype))
            shardings = shardings_by_path(config, generation_mesh(mesh_sizes(args.mesh)))
        model = load_hf_checkpoint(_absolute(args.hf_dir), dtype=getattr(jnp, args.dtype),
                                   shardings=shardings)
        save_hf_checkpoint(model, _absolute(args.out_dir), dtype=args.dtype,
                           max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
        print(f"wrote {args.out_dir}")
        return 0
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _absolute(path: str) -> Path:
    return Path(path).expanduser().absolute()


if __name__ == "__main__":
    sys.exit(main())
