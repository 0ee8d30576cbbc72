"""Do the delta-rule kernels fit a Hopper SM? Shared memory, registers and spills, without a GPU.

`jax.export` lowers the Pallas kernels (forward and backward) for `cuda` on this CPU machine;
each kernel's Triton IR is captured at lowering and compiled with pip `triton` for sm_90a, and
`ptxas -v` reports what one program (thread block) needs. The IR is also searched for
transposes of dot results that feed dots (a pattern Triton has miscompiled on Hopper). H100/H200 give a block at most
227 KB of shared memory (232,448 B, opt-in) and a thread 255 registers; what does not fit in
registers spills to local memory (slow, but it compiles).

    python benchmarks/gpu/kernel_resources.py                # bf16 at d = 128 and 64
    python benchmarks/gpu/kernel_resources.py --dtype float32 --head-dim 128

tests/test_kernel_resources.py runs the same check in CI with the limits below.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HOPPER_SHARED_BYTES = 232_448
# Spill stores per thread we accept: a few hundred bytes of local memory per program are
# cached in L1 at these occupancies; kilobytes (the old fused backward spilled 24 KB) are not.
SPILL_LIMIT_BYTES = 1024
CHUNK = 64


@dataclasses.dataclass(frozen=True)
class KernelResources:
    name: str
    warps: int
    shared_bytes: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    transposed_dot_results: int  # see `transposed_dot_results`

    def problems(self) -> list[str]:
        found = []
        if self.shared_bytes > HOPPER_SHARED_BYTES:
            found.append(f"{self.name}: {self.shared_bytes} B of shared memory per block "
                         f"(sm_90 allows {HOPPER_SHARED_BYTES})")
        if self.spill_store_bytes > SPILL_LIMIT_BYTES:
            found.append(f"{self.name}: spills {self.spill_store_bytes} B a thread "
                         f"(limit {SPILL_LIMIT_BYTES})")
        if self.transposed_dot_results:
            found.append(f"{self.name}: {self.transposed_dot_results} transposes of a dot result "
                         "feed a dot")
        return found


_DEFINITION = re.compile(r"^\s*(%[\w.]+)(?::\d+)?\s*=\s*([\w.]+)(.*)$")
_VALUE = re.compile(r"%[\w.]+")


def transposed_dot_results(ir_text: str) -> int:
    """How many `tt.trans` in Triton IR take a value computed from a `tt.dot` result (through
    any ops but loads) and feed a `tt.dot`: the shape behind known Hopper miscompiles
    (flash-linear-attention #640, triton #6124). Loop-carried values count as not derived."""
    ops, operands, users = {}, {}, {}
    for line in ir_text.splitlines():
        match = _DEFINITION.match(line)
        if not match:
            continue
        name, op, rest = match.groups()
        rest = rest.split(" : ")[0] if op == "tt.dot" else rest.split(":")[0]
        ops[name] = op
        operands[name] = [value for value in _VALUE.findall(rest) if value != name]
        for value in operands[name]:
            users.setdefault(value, []).append(name)
    derived = {}

    def from_dot(value):
        if value not in derived:
            derived[value] = False  # cycles (none in SSA) and loads end the walk
            op = ops.get(value)
            if op is not None and op != "tt.load":
                derived[value] = op == "tt.dot" or any(from_dot(v) for v in operands[value])
        return derived[value]

    def feeds_dot(value):
        seen, stack = set(), [value]
        while stack:
            for user in users.get(stack.pop(), []):
                if user not in seen:
                    if ops[user] == "tt.dot":
                        return True
                    seen.add(user)
                    stack.append(user)
        return False

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20 * len(ops) + 1000))
    return sum(1 for value, op in ops.items()
               if op == "tt.trans" and any(from_dot(v) for v in operands[value])
               and feeds_dot(value))


@contextlib.contextmanager
def _capture_triton_ir(modules: list):
    """Appends (kernel name, Triton IR text) for every Pallas call lowered for Triton."""
    from jax._src.pallas.triton import lowering, pallas_call_registration

    original = lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, *args, **kwargs):
        result = original(jaxpr, *args, **kwargs)
        text = result.module.operation.get_asm(enable_debug_info=False)
        modules.append((jaxpr.debug_info.func_name, text))
        return result

    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield
    finally:
        pallas_call_registration.lowering.lower_jaxpr_to_triton_module = original


def triton_modules(dtype_name: str = "bfloat16", head_dim: int = 128, key_heads: int = 2,
                   value_heads: int = 4, length: int = 256):
    """[(kernel name, Triton IR)] of the forward and backward kernels, one per distinct kernel,
    at Hv = 2 Hk, 64-token chunks, packed documents and an initial state."""
    import jax
    import jax.numpy as jnp
    from jax import export

    from qnext_jax.ops import gated_delta_rule

    dtype = jnp.dtype(dtype_name)

    def loss(q, k, v, g, beta, state0, segments):
        out, state = gated_delta_rule(q, k, v, g, beta, segment_ids=segments,
                                      initial_state=state0, impl="pallas",
                                      pallas_backend="triton", normalize_qk=True,
                                      chunk_size=CHUNK)
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(state)

    shape = jax.ShapeDtypeStruct
    args = (shape((1, length, key_heads, head_dim), dtype), shape((1, length, key_heads, head_dim), dtype),
            shape((1, length, value_heads, head_dim), dtype), shape((1, length, value_heads), jnp.float32),
            shape((1, length, value_heads), dtype),
            shape((1, value_heads, head_dim, head_dim), jnp.float32), shape((1, length), jnp.int32))
    modules = []
    with _capture_triton_ir(modules):
        export.export(
            jax.jit(jax.value_and_grad(loss, argnums=range(6))), platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*args)
    distinct, seen = [], set()
    for name, text in modules:  # `prepare` runs in the forward and again in the backward
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            distinct.append((name, text))
    return distinct


def compile_for_hopper(name: str, ir_text: str, warps: int, stages: int = 2) -> KernelResources:
    """Compiles Triton IR for sm_90a with pip triton and reads `ptxas -v`."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / f"{name}.ttir"
        source.write_text(ir_text)
        compiled = triton.compile(str(source), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": warps, "num_stages": stages})
        ptx = Path(folder) / f"{name}.ptx"
        ptx.write_text(compiled.asm["ptx"])
        ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
        report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", os.devnull],
                                capture_output=True, text=True, check=True)
    text = report.stdout + report.stderr
    number = lambda pattern: int(re.search(pattern, text).group(1))  # noqa: E731
    return KernelResources(
        name=name, warps=warps, shared_bytes=int(compiled.metadata.shared),
        registers=number(r"Used (\d+) registers"),
        spill_store_bytes=number(r"(\d+) bytes spill stores"),
        spill_load_bytes=number(r"(\d+) bytes spill loads"),
        transposed_dot_results=transposed_dot_results(ir_text),
    )


def kernel_resources(dtype_name: str = "bfloat16", head_dim: int = 128) -> list[KernelResources]:
    from qnext_jax.ops.chunked_delta.kernels import triton_warps

    return [compile_for_hopper(name, text, triton_warps(name))
            for name, text in triton_modules(dtype_name, head_dim)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--head-dim", type=int, action="append",
                        help="dk = dv (repeatable; default 128 and 64)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    failures = []
    for head_dim in args.head_dim or [128, 64]:
        print(f"\n{args.dtype}, dk = dv = {head_dim}, C = {CHUNK}, Hv = 2 Hk, sm_90a "
              f"(limits: {HOPPER_SHARED_BYTES} B shared, {SPILL_LIMIT_BYTES} B spilled)\n")
        print("| kernel | warps | shared B | registers | spill stores B | spill loads B | "
              "transposed dot results fed to dots |")
        print("|---|---|---|---|---|---|---|")
        for row in kernel_resources(args.dtype, head_dim):
            print(f"| {row.name} | {row.warps} | {row.shared_bytes:,} | {row.registers} | "
                  f"{row.spill_store_bytes:,} | {row.spill_load_bytes:,} | "
                  f"{row.transposed_dot_results} |", flush=True)
            failures += row.problems()
    if failures:
        sys.exit("over the limits:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    main()
