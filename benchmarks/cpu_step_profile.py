"""Where the CPU train step's time goes: a `jax.profiler` trace of our jitted step, every XLA:CPU
thunk's time summed and attributed to an op family through the compiled HLO's metadata (the
Python source file each instruction was traced from).

    python benchmarks/cpu_step_profile.py                     # configs/small.yaml, 8 x 256
    python benchmarks/cpu_step_profile.py --dense-variant     # also: a dense MLP of the MoE's
                                                              # active width in place of the MoE

The XLA:CPU runtime records one trace event per executed thunk (a fusion, a matmul, a sort, a
loop's body op) with the HLO instruction's name. The post-optimisation HLO text gives each
instruction a stack frame (its tables of files and frames print at the top of the module):
the innermost of our source files on that stack names the family, else the op's name (named
scopes: custom VJPs carry no source lines); a fusion without one takes the majority of the
instructions fused into it, and copies, transposes and loops are their own rows. Times are thunk times summed over the traced steps and divided by the steps; on two
cores two thunks may overlap, so the families' sum can exceed the wall time a little.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Families in the order the table prints them; within a frame the first matching rule wins.
FAMILIES = (
    # Fused projections carry only this file's frames (the traced stack is cut short there).
    ("input projections (fused: q k v z b a, q gate k v, gate up)", ("model/projections.py",)),
    ("routed experts", ("ops/grouped_matmul.py", "parallel/expert_parallel.py",
                        "ops/bucketed_swiglu.py", "routed_experts")),
    ("router + shared expert", ("model/moe.py", "model/mlp.py")),
    ("DeltaNet", ("model/deltanet.py", "ops/chunked_delta/", "ops/gated_delta_rule.py",
                  "ops/causal_conv.py", "ops/delta_rule_reference.py", "ops/segments.py")),
    ("attention", ("model/attention.py", "ops/blockwise_attention.py",
                   "ops/causal_attention.py", "ops/splash_attention.py", "model/rope.py",
                   "jax/_src/nn/functions.py")),
    ("norms", ("model/norms.py",)),
    ("LM head + loss", ("ops/linear_cross_entropy.py", "train/losses.py")),
    ("embedding, residuals, MTP glue", ("model/transformer.py", "model/decoder_layer.py",
                                        "model/mtp.py", "model/params.py")),
    # optax's update ops carry the train step's frame: step.py is the optimizer's row.
    ("optimizer update, clipping", ("optax/", "train/optimizer.py", "train/step.py")),
)
COPIES = "copies / transposes"
LOOPS = "loop control (scan bookkeeping)"
OTHER = "unattributed"

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S.*?\s([\w\-]+)\(")
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_TABLE_ROW = re.compile(r"^(\d+) (.*)$")


def family_of_source(sources: list[str]) -> str:
    """The family of the innermost frame (first in `sources`) that belongs to one."""
    for source in sources:
        for family, patterns in FAMILIES:
            if any(p in source for p in patterns):
                return family
    return OTHER


def _stack_tables(hlo_text: str) -> dict[int, list[str]]:
    """stack_frame_id -> the source files of that frame and its callers, innermost first, from
    the FileNames / FileLocations / StackFrames tables printed at the top of the HLO text."""
    tables: dict[str, dict[int, str]] = {}
    section = None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section, tables[line] = line, {}
            continue
        row = _TABLE_ROW.match(line) if section else None
        if row is None:
            if section and line.strip():
                section = None
            continue
        tables[section][int(row.group(1))] = row.group(2)
    files = {i: name.strip('"') for i, name in tables.get("FileNames", {}).items()}
    location_file = {i: files.get(int(re.search(r"file_name_id=(\d+)", text).group(1)), "")
                     for i, text in tables.get("FileLocations", {}).items()}
    frames = {}
    for i, text in tables.get("StackFrames", {}).items():
        location = int(re.search(r"file_location_id=(\d+)", text).group(1))
        parent = int(re.search(r"parent_frame_id=(\d+)", text).group(1))
        frames[i] = (location_file.get(location, ""), parent)
    return {frame: _callers(frame, frames) for frame in frames}


def _callers(frame, frames) -> list[str]:
    chain, seen = [], set()
    while frame in frames and frame not in seen:  # a root frame names itself as its parent
        seen.add(frame)
        chain.append(frames[frame][0])
        frame = frames[frame][1]
    return chain


def instruction_families(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> family. A copy or transpose (or a fusion XLA named for one) is a
    layout change, whatever source asked for it; a fusion otherwise takes the most common
    family among the instructions fused into it."""
    chains = _stack_tables(hlo_text)
    families_in: dict[str, list[str]] = collections.defaultdict(list)
    lines = []  # (name, opcode, family from its own metadata or None, called computation)
    computation = None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and "=" not in line.split("{")[0]:
            computation = head.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        frame, calls, op_name = _FRAME.search(line), _CALLS.search(line), _OP_NAME.search(line)
        # Source files innermost first, then the op's name (named scopes, for custom VJPs).
        sources = chains.get(int(frame.group(1)), []) if frame else []
        sources = sources + ([op_name.group(1)] if op_name else [])
        family = family_of_source(sources) if sources else None
        if family == OTHER:
            family = None
        lines.append((match.group(1), match.group(2), family, calls.group(1) if calls else None))
        if family:
            families_in[computation].append(family)
    families = {}
    for name, op, family, calls in lines:
        if op in ("copy", "transpose") or re.match(r"(transpose|copy)[_.]", name):
            families[name] = COPIES
        elif op in ("while", "conditional"):  # their bodies' thunks are recorded apart
            families[name] = LOOPS
        elif family is None and calls in families_in:
            families[name] = collections.Counter(families_in[calls]).most_common(1)[0][0]
        else:
            families[name] = family or OTHER
    return families


def thunk_seconds(trace_dir: str) -> dict[str, float]:
    """Summed seconds per HLO instruction name over every thunk event of the trace."""
    from jax.profiler import ProfileData

    totals: dict[str, float] = collections.defaultdict(float)
    for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
        for plane in ProfileData.from_file(path).planes:
            for line in plane.lines:
                for event in line.events:
                    stats = dict(event.stats)
                    if "hlo_op" in stats:
                        totals[stats["hlo_op"]] += event.duration_ns * 1e-9
    return totals


def profile_step(config, batch: int, seq_len: int, steps: int, warmup: int = 2) -> dict:
    import jax
    import numpy as np

    from cpu_training_throughput import make_single_device_trainer, random_rows
    from qnext_jax.data.batch import batch_from_packed_rows

    trainer = make_single_device_trainer(config, warmup + steps)
    state = trainer.init()
    rows = random_rows(config.vocab_size, batch, seq_len, warmup + steps)
    batches = [batch_from_packed_rows(r, np.ones_like(r)) for r in rows]
    hlo = trainer.step.lower(state, batches[0]).compile().as_text()
    for b in batches[:warmup]:
        state, metrics = trainer.step(state, b)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir):
            for b in batches[warmup:]:
                state, metrics = trainer.step(state, b)
            jax.block_until_ready(metrics)
        wall = (time.perf_counter() - start) / steps
        per_op = thunk_seconds(trace_dir)
    families = instruction_families(hlo)
    by_family: dict[str, float] = collections.defaultdict(float)
    by_op: dict[str, float] = {}
    for name, seconds in per_op.items():
        by_family[families.get(name, OTHER)] += seconds / steps
        by_op[name] = seconds / steps
    return {"wall": wall, "families": dict(by_family), "ops": by_op, "op_family": families}


def print_table(title: str, result: dict, top: int) -> None:
    total = sum(result["families"].values())
    print(f"\n{title}: {result['wall'] * 1e3:.0f} ms/step wall, thunks {total * 1e3:.0f} ms\n")
    print("| op family | ms/step | share |\n| --- | --- | --- |")
    order = [f for f, _ in FAMILIES] + [COPIES, LOOPS, OTHER]
    for family in order:
        seconds = result["families"].get(family, 0.0)
        if seconds:
            print(f"| {family} | {seconds * 1e3:.0f} | {seconds / total:.0%} |")
    print(f"\nlargest {top} thunks:\n\n| instruction | family | ms/step |\n| --- | --- | --- |")
    for name, seconds in sorted(result["ops"].items(), key=lambda kv: -kv[1])[:top]:
        print(f"| `{name}` | {result['op_family'].get(name, OTHER)} | {seconds * 1e3:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "small.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="traced steps")
    parser.add_argument("--top", type=int, default=12, help="largest thunks listed")
    parser.add_argument("--no-mtp", action="store_true", help="without the MTP module")
    parser.add_argument("--num-experts", type=int, help="override the config's expert count")
    parser.add_argument("--dense-variant", action="store_true",
                        help="also profile a dense MLP of the MoE's active width instead of it")
    args = parser.parse_args()

    from cpu_training_throughput import dense_of_active_width
    from qnext_jax.config import ModelConfig
    from qnext_jax.host_memory import reuse_cpu_step_memory

    reuse_cpu_step_memory()  # as train.py does
    config = ModelConfig.from_yaml(args.config)
    if args.no_mtp:
        config = config.replace(mtp_num_hidden_layers=0)
    if args.num_experts:
        config = config.replace(num_experts=args.num_experts)
    runs = [("qnext_jax train step (as configured)", config)]
    if args.dense_variant:
        runs.append(("the same, a dense MLP of the MoE's active width", dense_of_active_width(config)))
    for title, model in runs:
        print_table(title, profile_step(model, args.batch, args.seq_len, args.steps), args.top)


if __name__ == "__main__":
    main()
