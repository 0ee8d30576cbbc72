"""A plan as the text a user reads, and as one row of the recipes' table."""

from __future__ import annotations

import jax

from qnext_jax.plan.planner import Plan

GiB = 1024 ** 3
JAX_GPU_POOL = 0.75  # XLA_PYTHON_CLIENT_MEM_FRACTION's default


def gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB"


def size(value: float) -> str:
    """Bytes in the unit that reads best."""
    if value >= GiB:
        return f"{value / GiB:.2f} GiB"
    if value >= 2 ** 20:
        return f"{value / 2 ** 20:.1f} MiB"
    return f"{value / 2 ** 10:.1f} KiB"


def format_plan(plan: Plan, buffers: int = 12) -> str:
    c, t = plan.compiled, plan.target
    tc = plan.config.train
    mesh = " x ".join(f"{name} {size}" for name, size in plan.mesh.items() if size > 1) or "1 device"
    lines = [
        f"target     {t.describe()}; {gib(t.memory)} a device",
        f"run        mesh {mesh}; batch {tc.batch_size} x {tc.seq_len} tokens in "
        f"{tc.micro_batches} micro-batch(es); remat {plan.config.model.remat_policy}; "
        f"compute {plan.config.model.dtype}, parameters {plan.config.model.param_dtype}",
        f"compiler   jax {jax.__version__}{_libtpu() if t.platform == 'tpu' else ''}; compiled "
        f"in {c.compile_seconds:.0f} s; no autotuning without a device (default kernel tilings)",
        "",
        "memory a device (from the compiler)",
        f"  arguments     {gib(c.arguments)}   parameters, optimizer state, batch",
        f"  outputs       {gib(c.outputs)}   ({gib(c.aliased)} of them reuse donated arguments)",
        f"  temporaries   {gib(c.temporaries)}",
        f"  code          {gib(c.generated_code)}",
        f"  peak          {gib(c.peak)} of {gib(t.memory)} ({c.peak / t.memory:.0%}); budget "
        f"{gib(plan.budget)} with {plan.headroom:.0%} headroom",
        "",
        f"largest buffers live at the temporaries' peak: {len(c.peak_buffers)} values, "
        f"{size(sum(b.size for b in c.peak_buffers))} (state included); the same shape made "
        "by the same operation on one line",
    ]
    for (nbytes, shape, op), count in grouped_buffers(c.peak_buffers)[:buffers]:
        times = f" x{count}" if count > 1 else ""
        lines.append(f"  {size(nbytes):>10}{times:<4} {shape:<32} {op}")
    kernels = ", ".join(f"{name} x{count}" for name, count in sorted(c.custom_calls.items()))
    lines += [
        "",
        "step time floor (roofline, one device)",
        f"  FLOPs         {c.flops:.3g} compiled (custom-call kernels not counted), "
        f"{plan.model_flops:.3g} model",
        f"  compute       {plan.compute_seconds * 1e3:.1f} ms at {t.peak_flops / 1e12:.0f} "
        "TFLOP/s (dense bf16)",
        f"  memory        {plan.memory_seconds * 1e3:.1f} ms: {c.bytes_accessed / GiB:.1f} GiB "
        f"accessed at {t.bandwidth / 1e12:.2f} TB/s",
        f"  floor         {plan.floor_seconds * 1e3:.1f} ms a step",
        f"  kernels       {kernels or 'none'}",
        "",
    ]
    if c.refusal:
        lines += ["the compiler refused the program:"] + [f"  {line}" for line in
                                                         c.refusal.splitlines()] + [""]
    if t.platform == "cuda" and c.peak > JAX_GPU_POOL * t.memory:
        lines += [f"note: jax's GPU allocator takes {JAX_GPU_POOL:.0%} of the memory by default "
                  f"({gib(JAX_GPU_POOL * t.memory)}): run with XLA_PYTHON_CLIENT_MEM_FRACTION="
                  f"{min(0.95, c.peak / t.memory + 0.05):.2f} or more", ""]
    if plan.fits:
        lines.append(f"FITS: {gib(c.peak)} <= {gib(plan.budget)}")
    else:
        lines.append(f"DOES NOT FIT: {gib(c.peak)} > {gib(plan.budget)}. What would help:")
        lines += [f"  - {tip}" for tip in plan.advice()]
    return "\n".join(lines)


def grouped_buffers(buffers) -> list[tuple[tuple[int, str, str], int]]:
    """((size, shape, op), how many) largest first: a scan's per-layer copies, or one value
    per device of a stacked buffer, read as one line."""
    counts: dict[tuple[int, str, str], int] = {}
    for buffer in buffers:
        key = (buffer.size, buffer.shape, buffer.op)
        counts[key] = counts.get(key, 0) + 1
    return sorted(counts.items(), key=lambda item: -item[0][0] * item[1])


def plan_row(plan: Plan) -> dict:
    """The figures of one plan, for tables (benchmarks/plan_recipes.py)."""
    c = plan.compiled
    return {
        "target": plan.target.name,
        "mesh": ",".join(f"{k}={v}" for k, v in plan.mesh.items() if v > 1) or "1",
        "batch": f"{plan.config.train.batch_size}x{plan.config.train.seq_len}",
        "arguments_gib": c.arguments / GiB, "temporaries_gib": c.temporaries / GiB,
        "peak_gib": c.peak / GiB, "device_gib": plan.target.memory / GiB,
        "fits": plan.fits, "floor_ms": plan.floor_seconds * 1e3,
        "compile_s": c.compile_seconds,
        "largest": f"{size(c.peak_buffers[0].size)} {c.peak_buffers[0].shape} "
                   f"({c.peak_buffers[0].op})" if c.peak_buffers else "",
    }


def _libtpu() -> str:
    try:
        from importlib.metadata import version
        return f", libtpu {version('libtpu')}"
    except Exception:
        return ""
