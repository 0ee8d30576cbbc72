"""What the two global forms of the load-balancing loss cost per train step, from XLA's cost
analysis of the compiled step (FLOPs; the step's collectives on a mesh are counted by kind).

`loss.lbl_scope=global` (exact: every micro-batch balanced on the whole batch's counts) runs a
forward-only routing pass over the micro-batches before the accumulation loop; the default
`global_running` carries the counts seen so far through the loop instead. XLA's cost analysis
counts a loop body once, so the per-step figures are the program's FLOPs times the micro-batch
count (which counts the optimizer's update, outside the loops, M times: well under 1% of a
micro-batch's forward and backward here).

    python benchmarks/lbl_forms_cost.py                         # configs/small.yaml, 8 x 256, M=4
    python benchmarks/lbl_forms_cost.py --micro-batches 2 --mesh expert=4,fsdp=2
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "small.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--mesh", default="fsdp=1", help="axis=size,... (CPU devices are made)")
    args = parser.parse_args()
    mesh_sizes = {k: int(v) for k, v in (p.split("=") for p in args.mesh.split(","))}
    devices = 1
    for size in mesh_sizes.values():
        devices *= size
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    sys.path.insert(0, str(REPO_ROOT))

    import jax
    import numpy as np

    from qnext_jax.data.batch import batch_from_packed_rows
    from qnext_jax.parallel.axes import ShardingRules
    from qnext_jax.parallel.mesh import MeshConfig, make_mesh
    from qnext_jax.train.losses import LossConfig
    from qnext_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
    from qnext_jax.train.run_config import load_run_config
    from qnext_jax.train.step import abstract_state, make_trainer

    model = load_run_config(args.config, []).model
    rules = ShardingRules(model, make_mesh(MeshConfig(**{"fsdp": 1, **mesh_sizes})))
    optimizer = OptimizerConfig(total_steps=10, warmup_steps=1)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, model.vocab_size, (args.batch, args.seq_len + 1))
    print(f"{Path(args.config).name}: {args.batch} x {args.seq_len} tokens, "
          f"{args.micro_batches} micro-batches, mesh {args.mesh}, jax {jax.__version__}, "
          f"{jax.devices()[0].device_kind}")
    bodies = {}
    for scope in ("global_running", "global"):
        trainer = make_trainer(model, make_optimizer(optimizer), learning_rate_schedule(optimizer),
                               rules, loss_config=LossConfig(lbl_scope=scope),
                               micro_batches=args.micro_batches)
        batch = jax.device_put(batch_from_packed_rows(rows), trainer.batch_sharding)
        compiled = trainer.step.lower(abstract_state(trainer), batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        text = compiled.as_text()
        collectives = {kind: len(re.findall(rf" {kind}(?:-start)?\(", text))
                       for kind in ("all-to-all", "all-reduce", "all-gather", "reduce-scatter")}
        bodies[scope] = (cost["flops"], collectives)
    running, exact = bodies["global_running"][0], bodies["global"][0]
    count_pass = exact - running  # the routing pass's loop body: one micro-batch's forward
    m = args.micro_batches
    print("| form | FLOPs per step (loop bodies x M) | vs global_running | collectives in the program |")
    print("| --- | --- | --- | --- |")
    for scope, total in (("global_running", m * running), ("global", m * exact)):
        print(f"| `{scope}` | {total:.4g} | {total / (m * running):.3f} | "
              + ", ".join(f"{k} {v}" for k, v in bodies[scope][1].items() if v) + " |")
    print(f"the routing pass: {count_pass:.4g} FLOPs per micro-batch, "
          f"{count_pass / running:.1%} of a micro-batch's forward + backward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
