"""Expected memory and FLOPs per step of the GPU recipe (configs/gpu_1b.yaml) on one device.

    python benchmarks/gpu/recipe_plan.py [--config configs/gpu_1b.yaml] [--peak-tflops 989]

Parameters and AdamW moments: exact, from the shapes (fp32). Activations: the analytic model of
benchmarks/long_context_memory.py (the tensors each layer keeps; it undercounts XLA:CPU's
temporaries by up to 1.6x at long rows, so read it as a floor). FLOPs: the model FLOPs per
token that train.py reports MFU with (6 x active matmul parameters + attention + the chunked
delta rule + the LM heads), without remat's recomputation. Time at a given MFU follows.
"""

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
sys.path.insert(0, str(REPO_ROOT))

from long_context_memory import activation_bytes, parameter_temporaries  # noqa: E402

from qnext_jax.config import ModelConfig  # noqa: E402
from qnext_jax.train.run_config import load_run_config  # noqa: E402

GiB = 1024 ** 3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "gpu_1b.yaml"))
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="bf16 dense peak of the device (H100/H200 SXM: 989)")
    args = parser.parse_args()
    run = load_run_config(args.config)
    config: ModelConfig = run.model
    rows, length = run.train.batch_size, run.train.seq_len
    counts = config.param_counts()
    state = 3 * 4 * counts["total"]  # fp32 parameters + two AdamW moments
    temporaries = parameter_temporaries(config)  # gradients and the update
    print(f"{Path(args.config).name}: {counts['total'] / 1e9:.3f}B parameters "
          f"({counts['main'] / 1e9:.3f}B main + {counts['mtp'] / 1e9:.3f}B MTP), "
          f"{config.active_params_per_token() / 1e9:.3f}B active per token; "
          f"{rows} x {length} = {rows * length} tokens a step, compute {config.dtype}\n")
    print("| remat | parameters + AdamW GiB | gradients + update GiB | activations GiB (analytic) "
          "| total GiB |")
    print("|---|---|---|---|---|")
    for remat in ("full", "none"):
        activations = activation_bytes(config, rows=rows, length=length, sequence=1, remat=remat)
        print(f"| {remat} | {state / GiB:.1f} | {temporaries / GiB:.1f} | {activations / GiB:.1f} "
              f"| {(state + temporaries + activations) / GiB:.1f} |")
    per_token = config.training_flops_per_token(length)
    per_step = per_token * rows * length
    print(f"\nmodel FLOPs: {per_token / 1e9:.2f} GFLOP a token, {per_step / 1e12:.1f} TFLOP a step")
    print("\n| MFU | step s | tokens/s |")
    print("|---|---|---|")
    for mfu in (0.2, 0.3, 0.4, 0.5):
        seconds = per_step / (mfu * args.peak_tflops * 1e12)
        print(f"| {mfu:.0%} | {seconds:.3f} | {rows * length / seconds:,.0f} |")


if __name__ == "__main__":
    main()
