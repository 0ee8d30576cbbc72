"""A run's train step compiled by the target's own compiler, with no device of that kind here.

`jax.experimental.topologies` builds compile-only devices: XLA:GPU for a GPU described by a
`GpuTargetConfigProto` (with `jax[cuda12]`: ptxas comes with the CUDA wheels), and libtpu's
compiler for a named TPU topology (with `jax[tpu]`). The step is traced and compiled with the
target's first device as jax's default device, because kernels that check their device while
tracing (tokamax's grouped GEMM) would otherwise see this machine's CPU and refuse.

XLA's dump of the compiled module (buffer assignment, live ranges at the peak, the optimised
HLO) is read back for the buffers that make the peak and the operations that make them.
Without a device there is no autotuning: kernels keep their default tilings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path

import jax

from qnext_jax.config import ConfigError
from qnext_jax.ops.platform import lowering_for
from qnext_jax.plan.targets import Target
from qnext_jax.plan.trace import abstract_inputs
from qnext_jax.train.memory_check import peak_bytes

AOT_EXTRA = "pip install 'qnext_jax[aot]'"


class CompilerMissing(ConfigError):
    """The target's compiler is not installed; the message names the extra."""


def target_devices(target: Target) -> list:
    """The compile-only devices of `target`, ordered as the topology lists them."""
    from jax.experimental import topologies

    if target.platform == "cuda":
        try:
            import jax_cuda12_plugin  # noqa: F401  (XLA:GPU and ptxas)
        except ImportError:
            raise CompilerMissing(f"compiling for {target.name} needs XLA:GPU, which is not "
                                  f"installed: {AOT_EXTRA} (jax[cuda12] and tokamax)") from None
        return list(topologies.get_topology_desc(
            platform="cuda", target_config=target.gpu.target_config(),
            topology=target.gpu_topology).devices)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise CompilerMissing(f"compiling for {target.name} needs libtpu's compiler, which is "
                              f"not installed: {AOT_EXTRA} (jax[tpu])") from None
    # Several processes may load libtpu at once (test workers, a plan beside a test), and
    # there is no metadata server to ask what machine this is.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    kwargs = {"num_slices": target.slices} if target.slices > 1 else {}
    return list(topologies.get_topology_desc(platform="tpu", topology_name=target.tpu_topology,
                                              **kwargs).devices)


@dataclasses.dataclass(frozen=True)
class Buffer:
    name: str  # the HLO value
    size: int  # bytes
    shape: str
    op: str  # what made it: the jax operation's name, or the HLO opcode


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What the compiler says about one step on one device."""
    arguments: int
    outputs: int
    aliased: int  # output bytes that reuse donated arguments
    temporaries: int
    generated_code: int
    peak: int  # what a device holds at once (train.memory_check.peak_bytes)
    peak_buffers: list[Buffer]  # live at the peak of the temporaries, largest first
    flops: float  # XLA's cost analysis of the optimised module (custom calls count 0)
    bytes_accessed: float
    custom_calls: dict[str, int]  # kernels XLA does not see into, by target name
    compile_seconds: float
    hlo: str  # the optimised module
    refusal: str = ""  # the compiler's own out-of-memory error, when it refused the program


def compile_step(trainer, global_batch: int, seq_len: int, target: Target,
                 dump: str | None = None) -> Compiled:
    """The trainer's step (its mesh must be made of `target`'s devices) compiled for `target`."""
    state, batch = abstract_inputs(trainer, global_batch, seq_len)
    return compile_jitted(trainer.step, (state, batch), target,
                          trainer.batch_sharding.mesh.devices.flat[0], dump=dump)


def compile_jitted(jitted, args, target: Target, device, dump: str | None = None) -> Compiled:
    """A jitted function compiled for `target` on abstract `args` (ShapeDtypeStructs placed
    on `target`'s devices; `device` one of them). dump: a directory that keeps the compiler's
    dump (default: a temporary one)."""
    keep = contextlib.nullcontext(dump) if dump else None
    if keep is not None:
        Path(dump).mkdir(parents=True, exist_ok=True)
    with keep or tempfile.TemporaryDirectory(prefix="qnext_plan_") as dump, _quiet_tokamax(), \
            jax.default_device(device), lowering_for(target.platform):
        start = time.perf_counter()
        lowered = jitted.trace(*args).lower()
        try:
            compiled = lowered.compile({"xla_dump_to": dump})
        except Exception as error:  # the TPU compiler refuses a program over its HBM
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            return refused(str(error), args, target, time.perf_counter() - start)
        seconds = time.perf_counter() - start
        memory = compiled.memory_analysis()
        module = step_module(Path(dump))
        hlo = module["hlo"].read_text()
        buffers = peak_buffers(module["live_range"].read_text(), hlo)
    modules = compiled.runtime_executable().hlo_modules()
    cost = _cost_analysis(modules[0])
    return Compiled(
        arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
        aliased=memory.alias_size_in_bytes, temporaries=memory.temp_size_in_bytes,
        generated_code=memory.generated_code_size_in_bytes, peak=peak_bytes(memory),
        peak_buffers=buffers,
        flops=cost.get("flops", 0.0), bytes_accessed=cost.get("bytes accessed", 0.0),
        custom_calls=custom_call_targets(hlo), compile_seconds=seconds, hlo=hlo,
    )


def refused(message: str, args, target: Target, seconds: float) -> Compiled:
    """A program the compiler refused for memory, as far as it is known: the arguments from the
    abstract inputs' shard shapes, the temporaries the compiler says it needed (the device's
    memory when its message does not say)."""
    arguments = sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                    for leaf in jax.tree.leaves(args))
    match = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", message)
    scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    temporaries = (int(float(match.group(1)) * scale[match.group(2)]) if match
                   else target.memory)
    return Compiled(arguments=arguments, outputs=arguments, aliased=arguments,
                    temporaries=temporaries, generated_code=0, peak=arguments + temporaries,
                    peak_buffers=[], flops=0.0, bytes_accessed=0.0, custom_calls={},
                    compile_seconds=seconds, hlo="",
                    refusal="\n".join(message.strip().splitlines()[:40]))


@contextlib.contextmanager
def _quiet_tokamax():
    """tokamax logs a warning with its arguments' full repr for every kernel it cannot find
    an autotuned config for: all of them, with no device to tune on."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def step_module(dump: Path) -> dict[str, Path]:
    """The dump's files of the step's module (the largest one: XLA also compiles small helper
    modules) after optimisation."""
    live_ranges = sorted(dump.glob("*after_optimizations-live-range.txt"),
                         key=lambda p: p.stat().st_size)
    if not live_ranges:
        raise RuntimeError(f"the compiler wrote no live ranges to its dump ({sorted(dump.iterdir())[:5]})")
    live_range = live_ranges[-1]
    hlo = Path(str(live_range).replace("-live-range.txt", ".txt"))
    return {"live_range": live_range, "hlo": hlo}


def _cost_analysis(module) -> dict:
    """XLA's HLO cost analysis of the optimised module, run by the CPU client (the
    compile-only GPU client has none)."""
    from jax._src.lib import xla_client

    cpu = jax.local_devices(backend="cpu")[0].client
    return dict(xla_client._xla.hlo_module_cost_analysis(cpu, module))


_LIVE = re.compile(r"^\s+(\S+?)\{([\d,]*)\}: (\d+) bytes")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]+)"')


def peak_buffers(live_range_text: str, hlo_text: str) -> list[Buffer]:
    """The values XLA's live-range analysis holds live at the peak, largest first, each with
    its shape and the jax operation that made it (from the optimised module's metadata)."""
    section = live_range_text.split("(peak):", 1)
    if len(section) < 2:
        return []
    live = []
    for line in section[1].splitlines():
        if "Stack trace" in line:
            break
        match = _LIVE.match(line)
        if match:
            live.append((match.group(1), match.group(2), int(match.group(3))))
    made_by = instruction_table(hlo_text)
    buffers = []
    for name, index, size in live:
        shape, opcode, op_name = made_by.get(name, ("?", "?", ""))
        what = _short_op(op_name) or opcode
        if shape.startswith("("):
            if not index:
                continue  # a tuple's own table of pointers; its elements are listed themselves
            shape = tuple_element(shape, [int(i) for i in index.split(",")])
            what = f"{what} (output {index})"
        buffers.append(Buffer(f"{name}{{{index}}}", size, shape, what))
    return sorted(buffers, key=lambda b: -b.size)


def tuple_element(shape: str, index: list[int]) -> str:
    """The shape at `index` of a tuple shape's text: "(f32[2], (s32[], bf16[4]))", [1, 1]."""
    for i in index:
        if not shape.startswith("("):
            return shape
        parts, depth, start = [], 0, 1
        for position, char in enumerate(shape):
            if char in "([":
                depth += 1
            elif char in ")]":
                depth -= 1
            elif char == "," and depth == 1:
                parts.append(shape[start:position])
                start = position + 1
        parts.append(shape[start:-1])
        parts = [re.sub(r"/\*index=\d+\*/", "", p).strip() for p in parts]
        if i >= len(parts):
            return "?"
        shape = parts[i]
    return shape


def instruction_table(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """name -> (shape, opcode, jax op_name) of every instruction in an HLO module's text."""
    table = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            op_name = _OP_NAME.search(line)
            shape = re.sub(r"\{[^{}]*\}", "", match.group(2))  # layouts out
            table[match.group(1)] = (shape, match.group(3), op_name.group(1) if op_name else "")
    return table


def _short_op(op_name: str) -> str:
    """jit(step)/jvp(...)/while/body/.../dot_general -> the last few path parts that say what."""
    op_name = op_name.split("{", 1)[0].rstrip(":")  # custom calls append their arguments
    parts = [p for p in op_name.split("/") if p and not p.startswith("jit(")]
    return "/".join(parts[-4:])


def custom_call_targets(hlo_text: str) -> dict[str, int]:
    """Kernels in the compiled program by custom-call target (Triton, Mosaic, cuDNN, ...)."""
    counts: dict[str, int] = {}
    for target in re.findall(r'custom_call_target="([^"]+)"', hlo_text):
        counts[target] = counts.get(target, 0) + 1
    return counts


def dense_expert_buffers(hlo_text: str, num_experts: int, routed_rows: int) -> list[str]:
    """Shapes in the program with both an all-experts and an all-routed-rows dimension: the
    dense expansion of a grouped matmul (every row times every expert's matrix)."""
    found = set()
    for dims in re.findall(r"\[([\d,]+)\]", hlo_text):
        sizes = [int(d) for d in dims.split(",") if d]
        if num_experts in sizes and routed_rows in sizes and len(sizes) >= 2:
            rest = list(sizes)
            rest.remove(num_experts)
            if routed_rows in rest:
                found.add(f"[{dims}]")
    return sorted(found)
