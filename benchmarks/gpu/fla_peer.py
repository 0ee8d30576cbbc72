"""flash-linear-attention's `chunk_gated_delta_rule`, timed beside device_check.py on the GPU.

    PYTHONPATH=<FLA site> python benchmarks/gpu/fla_peer.py --out $OUT [--force-backward]

Same inputs as device_check.py and benchmarks/gated_delta_rule.py (seeded numpy), bf16, grouped
value heads native (q, k not repeated), q/k L2-normalised in the kernel as ours. Tensors are
made once, outside the timed calls; CUDA events time each call. FLA autotunes every kernel on
its first call: that warm-up runs while device_check.py compiles; the timing waits (bounded)
for OUT/jax_compiled and writes OUT/fla_done at the end (also on failure), so the two never
time at once.

FLA refuses its gated backward on Hopper with Triton 3.4-3.7.0 (a Triton miscompile,
flash-linear-attention #640); --force-backward lifts that guard so the backward can be timed.
Its backward's values are then not to be trusted, and are not used.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from delta_rule_inputs import make_inputs as inputs  # beside this script

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="/tmp/device_check")
parser.add_argument("--force-backward", action="store_true")
parser.add_argument("--wait-jax-s", type=float, default=300.0)
args = parser.parse_args()
OUT = Path(args.out)
OUT.mkdir(parents=True, exist_ok=True)
T0 = time.time()
SHAPES = [(4, 8192, 16, 32, 128), (1, 32768, 16, 32, 128)]


def log(*parts):
    print(f"[fla {time.time() - T0:6.1f}s]", *parts, flush=True)


def result(**fields):
    print("RESULT " + json.dumps(fields), flush=True)


def main():
    import torch
    import triton
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    log("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
    if args.force_backward:
        import fla.ops.common.chunk_o as chunk_o

        chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only, see the docstring

    def tensors(arrays, grad):
        dtypes = (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16)
        return [torch.tensor(x, dtype=dt, device="cuda").requires_grad_(grad)
                for x, dt in zip(arrays, dtypes)]

    def run(q, k, v, g, beta):
        return chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0]

    def cuda_time(function, iterations=10):
        function()
        torch.cuda.synchronize()
        times = []
        for _ in range(iterations):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return dict(median_ms=round(statistics.median(times), 3), min_ms=round(min(times), 3))

    plans = []
    for shape in SHAPES:
        frozen, trainable = tensors(inputs(shape), False), tensors(inputs(shape), True)

        def forward(frozen=frozen):
            with torch.no_grad():
                run(*frozen)

        def both(trainable=trainable):
            for x in trainable:
                x.grad = None
            run(*trainable).float().sum().backward()

        start = time.time()
        forward()
        torch.cuda.synchronize()
        try:
            both()
            torch.cuda.synchronize()
        except Exception as error:  # e.g. the Hopper guard without --force-backward
            result(stage="speed", impl="fla", shape=shape, mode="fwd+bwd", status="failed",
                   error=str(error)[:400])
            both = None
        log(f"warm-up (autotuning) {shape}: {time.time() - start:.1f}s")
        plans.append((shape, forward, both))
    start = time.time()
    while not (OUT / "jax_compiled").exists() and time.time() - start < args.wait_jax_s:
        time.sleep(1)
    log(f"waited {time.time() - start:.0f}s for device_check's compile")
    for shape, forward, both in plans:
        result(stage="speed", impl="fla", mode="fwd", shape=shape, **cuda_time(forward))
        if both is not None:
            result(stage="speed", impl="fla", mode="fwd+bwd", shape=shape, **cuda_time(both))


try:
    main()
finally:
    (OUT / "fla_done").write_text("1")
    log("done")
