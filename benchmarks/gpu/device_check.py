"""The device check: are the kernels right and fast on this GPU, and what MFU does the recipe get?

    bash benchmarks/gpu/run_device_check.sh          # on the GPU machine (~6-8 min; see there)
    python benchmarks/gpu/device_check.py --dry-run  # CPU: interpret mode, tiny shapes (~1 min)

Stages, in priority order (each prints `RESULT {json}` lines, and OUT/results.json is
rewritten after each one, so a run cut short keeps what it measured):
  correct    the Pallas delta rule, bf16 and fp32, fwd + bwd with documents and an initial
             state, against the fp32 XLA `chunked` rule: output, final state, all six gradients;
             the experts' grouped matmul (the platform's choice and XLA's ragged_dot) against
             the tiled form, values and both gradients
  speed A    pallas vs chunked, forward and forward + backward, at (B, T) = (4, 8192), Hk = 16,
             Hv = 32, d = 128, bf16 (FLA is timed beside it by fla_peer.py)
  recipe     train steps of configs/gpu_1b.yaml (8 x 4096 tokens): tokens/s and MFU
  experts    the grouped matmul, platform choice vs ragged_dot, fwd + bwd at the recipe's shape
  attention  tokamax's Mosaic GPU flash kernel (what `auto` runs on Hopper) and the blockwise XLA
             fallback, bf16, on packed documents with a reused id — a whole row and a
             context-parallel query shard — against the fp32 blockwise attention (output and
             dq, dk, dv); then both and cuDNN's own API (causal, no documents: its public API
             has none) timed forward and forward + backward at 8 x 4096 and 1 x 32768
             (16 query / 2 kv heads of 256, the 80B's attention)
  kernels    each of the nine kernels alone at (4, 8192)
  speed B    the same at (1, 32768)
Everything is compiled first, in threads, while the FLA peer autotunes; then OUT/jax_compiled is
written and the timing waits (bounded) for OUT/fla_done, so the two never time at once.
A job that fails to compile is reported and its checks skipped; nothing else depends on it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--dry-run", action="store_true")
parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/device_check"))
parser.add_argument("--budget-s", type=float, default=400.0,
                    help="skip the stages that would start past this wall time")
parser.add_argument("--wait-peer-s", type=float, default=240.0,
                    help="how long to wait for the FLA peer's timing to finish (0: not at all)")
parser.add_argument("--workers", type=int, default=8)
args = parser.parse_args()
if args.dry_run:
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from attention_inputs import attention_inputs, causal_flops, forward_and_backward  # noqa: E402
from delta_rule_inputs import chunked_flops, make_inputs  # noqa: E402  (beside this script)
from qnext_jax.config import ModelConfig  # noqa: E402
from qnext_jax.data.batch import batch_from_packed_rows  # noqa: E402
from qnext_jax.ops import gated_delta_rule  # noqa: E402
from qnext_jax.ops.chunked_delta import backward_kernels, kernels, pallas  # noqa: E402
from qnext_jax.ops.grouped_matmul import grouped_matmul  # noqa: E402
from qnext_jax.parallel.axes import ShardingRules  # noqa: E402
from qnext_jax.parallel.mesh import MeshConfig, make_mesh  # noqa: E402
from qnext_jax.train.optimizer import (  # noqa: E402
    OptimizerConfig, learning_rate_schedule, make_optimizer,
)
from qnext_jax.plan.trace import abstract_inputs  # noqa: E402
from qnext_jax.train.progress import peak_tflops_per_device  # noqa: E402
from qnext_jax.train.step import make_trainer  # noqa: E402

T0 = time.time()
OUT = Path(args.out)
OUT.mkdir(parents=True, exist_ok=True)
BF16, F32 = jnp.bfloat16, jnp.float32
DRY = args.dry_run
# The dry run takes the Triton-shaped path (native layout, blocked inverse) in interpret mode.
BACKEND = "interpret_loop" if DRY else None
if DRY:
    SHAPES = dict(C=(1, 128, 2, 4, 32), A=(1, 128, 2, 4, 32), B=(1, 256, 2, 4, 32))
    EXPERTS = dict(rows=512, hidden=64, width=32, groups=8)
    RECIPE, RECIPE_BATCH = "tiny.yaml", (2, 128)
    ATTENTION = dict(heads=4, kv_heads=2, dim=32, correct=(1, 256), recipe=(2, 256), long=(1, 512))
    ATTENTION_IMPLS = ("blockwise",)  # the kernel and cuDNN need the GPU
    ITERS = 2
else:
    SHAPES = dict(C=(1, 1024, 16, 32, 128), A=(4, 8192, 16, 32, 128), B=(1, 32768, 16, 32, 128))
    EXPERTS = dict(rows=65536, hidden=1024, width=256, groups=64)  # 8K tokens x top-8
    RECIPE, RECIPE_BATCH = "gpu_1b.yaml", (8, 4096)
    ATTENTION = dict(heads=16, kv_heads=2, dim=256, correct=(1, 1024), recipe=(8, 4096),
                     long=(1, 32768))
    ATTENTION_IMPLS = ("mosaic_gpu", "blockwise", "cudnn")
    ITERS = 10
GROUPED = ("auto", "ragged") if not DRY else ("tiled", "ragged")
RESULTS = []


def log(*parts):
    print(f"[{time.time() - T0:6.1f}s]", *parts, flush=True)


def result(**fields):
    """Printed and written at once: a check killed by its timeout keeps what it measured."""
    RESULTS.append(fields)
    print("RESULT " + json.dumps(fields), flush=True)
    (OUT / "results.json").write_text(json.dumps(RESULTS, indent=1))


def error_text(error, limit=1500):
    return "".join(traceback.format_exception_only(type(error), error))[-limit:]


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.all(np.isfinite(got)):
        return float("nan")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def delta_rule_inputs(shape, dtype, seed=0):
    """q, k, v, g, beta as jax arrays (delta_rule_inputs.py: the same as the FLA peer's)."""
    q, k, v, g, beta = make_inputs(shape, seed)
    return ([jnp.asarray(x, dtype) for x in (q, k, v)]
            + [jnp.asarray(g), jnp.asarray(beta, dtype)])


def correctness_inputs(shape, dtype):
    """delta_rule_inputs + documents (~3 a row), an initial state and the loss's cotangents."""
    batch, length, _, value_heads, dim = shape
    rng = np.random.default_rng(2)
    segments = np.cumsum(rng.uniform(size=(batch, length)) < 3.0 / length, axis=1)
    state0 = 0.1 * rng.standard_normal((batch, value_heads, dim, dim))
    d_out = rng.standard_normal((batch, length, value_heads, dim))
    d_state = rng.standard_normal((batch, value_heads, dim, dim))
    return delta_rule_inputs(shape, dtype, seed=1) + [
        jnp.asarray(state0, F32), jnp.asarray(segments, jnp.int32), jnp.asarray(d_out, F32),
        jnp.asarray(d_state, F32)]


def rule(impl):
    backend = BACKEND if impl == "pallas" else None
    return lambda q, k, v, g, beta, state0=None, segments=None: gated_delta_rule(
        q, k, v, g, beta, segment_ids=segments, initial_state=state0, impl=impl,
        normalize_qk=True, chunk_size=64, pallas_backend=backend)


def forward_backward(impl):
    """-> (out, final state, the six gradients) under random cotangents."""
    def run(q, k, v, g, beta, state0, segments, d_out, d_state):
        def loss(*inputs):
            out, state = rule(impl)(*inputs, segments)
            return jnp.sum(out.astype(F32) * d_out) + jnp.sum(state * d_state), (out, state)
        (_, (out, state)), grads = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(
            q, k, v, g, beta, state0)
        return out, state, grads
    return run


def timed_pair(impl):
    """(forward, forward + backward) as benchmarks/gated_delta_rule.py times them."""
    forward = lambda *a: rule(impl)(*a)[0]  # noqa: E731
    both = jax.grad(lambda *a: jnp.sum(forward(*a).astype(F32)), argnums=range(5))
    return forward, both


def kernel_chain(shape):
    """The nine kernels at `shape` (bf16, no documents) as functions of what the previous ones
    return, and the kernel inputs: (cfg, inputs, {name: (fn, input names)})."""
    batch, length, _, value_heads, dim = shape
    q, k, v, g, beta = delta_rule_inputs(shape, BF16)
    cfg, inputs = pallas.kernel_inputs(
        q, k, v, g, beta, jnp.zeros((batch, length), jnp.int32),
        jnp.zeros((batch, value_heads, dim, dim), F32), backend=BACKEND, normalize_qk=True)
    chain = {
        "inverse": (lambda k, beta, gamma, docs: kernels.inverse(cfg, k, beta, gamma, docs),
                    ("k", "beta", "gamma", "docs")),
        "prepare": (lambda a, k, v, beta, start: kernels.prepare(cfg, a, k, v, beta, start),
                    ("a", "k", "v", "beta", "start")),
        "state_pass": (lambda u, w, k, start, end, s0: kernels.state_pass(cfg, u, w, k, start, end, s0),
                       ("u", "w", "k", "start", "end", "s0")),
        "output": (lambda q, k, states, v_new, gamma, start, docs: kernels.output(
            cfg, q, k, states, v_new, gamma, start, docs, BF16),
            ("q", "k", "states", "v_new", "gamma", "start", "docs")),
        "local_dv": (lambda q, k, d_out, gamma, docs: backward_kernels.local_dv(cfg, q, k, d_out, gamma, docs),
                     ("q", "k", "d_out", "gamma", "docs")),
        "state_pass_backward": (lambda d_final, d_out, dvl, w, q, k, start, end:
                                backward_kernels.state_pass_backward(cfg, d_final, d_out, dvl, w, q, k, start, end),
                                ("d_final", "d_out", "d_v_local", "w", "q", "k", "start", "end")),
        "output_backward": (lambda q, k, u, w, states, ds, d_out, gamma, start, end, docs:
                            backward_kernels.output_backward(cfg, q, k, u, w, states, ds, d_out, gamma,
                                                    start, end, docs),
                            ("q", "k", "u", "w", "states", "d_states_end", "d_out", "gamma",
                             "start", "end", "docs")),
        "wy_backward": (lambda a, k, v, beta, gamma, start, docs, states, dvn: backward_kernels.wy_backward(
            cfg, a, k, v, beta, gamma, start, docs, states, dvn),
            ("a", "k", "v", "beta", "gamma", "start", "docs", "states", "d_v_new")),
    }
    names = ("q", "k", "v", "beta", "gamma", "start", "end", "docs", "s0")
    return dict(zip(names, inputs)), chain


# What each kernel of the chain returns, by the names later kernels take them under.
KERNEL_OUTPUTS = {"inverse": ("a",), "prepare": ("u", "w"), "state_pass": ("v_new", "states", "final"),
                  "output": ("out",), "local_dv": ("d_v_local",),
                  "state_pass_backward": ("d_v_new", "d_states_end", "d_initial")}


def walk_chain(values, chain, run):
    """Feeds the chain: run(name, function, inputs) -> outputs; the backward kernels take the
    forward's output as dO. Fills `values`; -> {kernel: its inputs}."""
    used = {}
    for name, (function, needs) in chain.items():
        if name == "local_dv":
            values["d_out"], values["d_final"] = values["out"], jnp.zeros_like(values["final"])
        used[name] = [values[n] for n in needs]
        out = run(name, function, used[name])
        for key, value in zip(KERNEL_OUTPUTS.get(name, ()),
                              out if isinstance(out, (tuple, list)) else (out,)):
            values[key] = value
    return used


def grouped_inputs(dtype):
    rng = np.random.default_rng(3)
    e = EXPERTS
    sizes = rng.multinomial(e["rows"], np.ones(e["groups"]) / e["groups"]).astype(np.int32)
    rows = jnp.asarray(rng.standard_normal((e["rows"], e["hidden"])), dtype)
    weights = jnp.asarray(rng.standard_normal((e["groups"], e["hidden"], e["width"]))
                          / np.sqrt(e["hidden"]), dtype)
    return rows, weights, jnp.asarray(sizes)


def grouped_fwd_bwd(impl):
    def run(rows, weights, sizes):
        def loss(r, w):
            out = grouped_matmul(r, w, sizes, impl=impl)
            return jnp.sum(jnp.sin(out.astype(F32))), out
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(rows, weights)
        return out, grads
    return run


def recipe_step():
    config = ModelConfig.from_yaml(REPO_ROOT / "configs" / RECIPE)
    mesh = make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
    optimizer = OptimizerConfig()
    trainer = make_trainer(config, make_optimizer(optimizer), learning_rate_schedule(optimizer),
                           ShardingRules(config, mesh))
    rows, length = RECIPE_BATCH
    tokens = np.random.default_rng(4).integers(0, config.vocab_size, (rows, length + 1))
    batch = jax.device_put(batch_from_packed_rows(tokens), trainer.batch_sharding)
    abstract_state, abstract_batch = abstract_inputs(trainer, rows, length)
    return config, trainer, batch, (abstract_state, abstract_batch)


# ----------------------------------------------------------------------------- compile
log("jax", jax.__version__, "backend", jax.default_backend(), "device", jax.devices()[0].device_kind)
def tokamax_status():
    try:
        import tokamax  # noqa: F401
    except Exception as error:  # the GPU's grouped matmul would fall back to ragged_dot
        return f"not importable: {error_text(error, 300)}"
    return "importable"


TOKAMAX = tokamax_status()
result(stage="env", jax=jax.__version__, device=jax.devices()[0].device_kind, dry_run=DRY,
       tokamax=TOKAMAX, xla_flags=os.environ.get("XLA_FLAGS", ""))
if not DRY and TOKAMAX != "importable":
    result(stage="env", status="failed", error="tokamax missing: the experts run XLA's "
           "ragged_dot on this GPU ('experts auto' times the same as 'experts ragged')")
INPUTS, JOBS = {}, {}  # name -> (function, arguments)
INPUTS["C bf16"] = correctness_inputs(SHAPES["C"], BF16)
INPUTS["C fp32"] = correctness_inputs(SHAPES["C"], F32)
JOBS["reference C"] = (forward_backward("chunked"), INPUTS["C fp32"])
JOBS["pallas C bf16"] = (forward_backward("pallas"), INPUTS["C bf16"])
JOBS["pallas C fp32"] = (forward_backward("pallas"), INPUTS["C fp32"])
for shape in ("A", "B"):
    INPUTS[shape] = delta_rule_inputs(SHAPES[shape], BF16)
    for impl in ("pallas", "chunked"):
        if shape == "B" and impl == "chunked":
            continue  # XLA's scan at 32K tokens adds minutes and says nothing new
        forward, both = timed_pair(impl)
        JOBS[f"{impl} fwd {shape}"] = (forward, INPUTS[shape])
        JOBS[f"{impl} fwd+bwd {shape}"] = (both, INPUTS[shape])
KERNEL_VALUES, CHAIN = kernel_chain(SHAPES["A"])
INPUTS["experts fp32"], INPUTS["experts bf16"] = grouped_inputs(F32), grouped_inputs(BF16)
JOBS["experts reference"] = (grouped_fwd_bwd("tiled"), INPUTS["experts fp32"])
for impl in GROUPED:
    JOBS[f"experts {impl}"] = (grouped_fwd_bwd(impl), INPUTS["experts bf16"])
A = ATTENTION
HALF = A["correct"][1] // 2
for dtype, name in ((BF16, "bf16"), (F32, "fp32")):
    q, k, v, docs, cotangent = attention_inputs(*A["correct"], A["heads"], A["kv_heads"],
                                                A["dim"], dtype, seed=5)
    INPUTS[f"attention row {name}"] = [q, k, v, docs, cotangent]
    # A sequence shard: the row's second half of queries against all of its keys.
    INPUTS[f"attention shard {name}"] = [q[:, HALF:], k, v, docs, cotangent[:, HALF:]]
for start, label in ((None, "row"), (HALF, "shard")):
    JOBS[f"attention reference {label}"] = (
        forward_and_backward("blockwise", start)[1], INPUTS[f"attention {label} fp32"])
    for impl in ATTENTION_IMPLS:
        if impl != "cudnn":  # no documents: nothing to compare on packed rows
            JOBS[f"attention {impl} {label}"] = (
                forward_and_backward(impl, start)[1], INPUTS[f"attention {label} bf16"])
for size in ("recipe", "long"):
    INPUTS[f"attention {size}"] = attention_inputs(*A[size], A["heads"], A["kv_heads"], A["dim"], BF16)
    for impl in ATTENTION_IMPLS:
        forward, both = forward_and_backward(impl)
        JOBS[f"attention {impl} fwd {size}"] = (forward, INPUTS[f"attention {size}"])
        JOBS[f"attention {impl} fwd+bwd {size}"] = (both, INPUTS[f"attention {size}"])
COMPILED, COMPILE_S = {}, {}
RECIPE_PARTS = recipe_step()


def compile_job(name):
    function, arguments = JOBS[name]
    start = time.time()
    try:
        return name, jax.jit(function).lower(*arguments).compile(), None
    except Exception as error:  # reported; its checks are skipped
        return name, None, error_text(error)
    finally:
        COMPILE_S[name] = round(time.time() - start, 1)


def compile_recipe():
    _, trainer, _, (abstract_state, abstract_batch) = RECIPE_PARTS
    start = time.time()
    try:
        COMPILED["recipe"] = trainer.step.trace(abstract_state, abstract_batch).lower().compile()
    except Exception as error:
        result(stage="compile", job="recipe", error=error_text(error, 700))
    finally:
        COMPILE_S["recipe"] = round(time.time() - start, 1)


def compile_all():
    log(f"compiling {len(JOBS) + 1} jobs with {args.workers} threads")
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        recipe = pool.submit(compile_recipe)  # the longest compile: first
        for name, executable, error in pool.map(compile_job, sorted(JOBS, key=lambda n: "fwd+bwd" not in n)):
            if executable is None:
                log(f"COMPILE FAILED {name}: {error}")
                result(stage="compile", job=name, error=error[-700:])
            else:
                COMPILED[name] = executable
        recipe.result()
    # The kernels one by one, on the shapes the previous ones return.
    def compile_kernel(name, function, inputs):
        start = time.time()
        try:
            COMPILED[f"kernel {name}"] = jax.jit(function).lower(*inputs).compile()
        finally:
            COMPILE_S[f"kernel {name}"] = round(time.time() - start, 1)
        return jax.eval_shape(function, *inputs)

    try:
        walk_chain(dict(KERNEL_VALUES), CHAIN, compile_kernel)
    except Exception as error:
        result(stage="compile", job="kernel chain", error=error_text(error, 700))


compile_all()
result(stage="compile", seconds=COMPILE_S, wall_s=round(time.time() - T0, 1))
(OUT / "jax_compiled").write_text("1")
if args.wait_peer_s > 0:
    start = time.time()
    while not (OUT / "fla_done").exists() and time.time() - start < args.wait_peer_s:
        time.sleep(1)
    log(f"waited {time.time() - start:.0f}s for the FLA peer ({(OUT / 'fla_done').exists()})")


# ----------------------------------------------------------------------------- stages
def timing(executable, arguments, iterations=ITERS):
    jax.block_until_ready(executable(*arguments))
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        jax.block_until_ready(executable(*arguments))
        times.append(time.perf_counter() - start)
    return dict(median_ms=round(statistics.median(times) * 1e3, 3),
                min_ms=round(min(times) * 1e3, 3))


def correct():
    if "reference C" not in COMPILED:
        return
    want_out, want_state, want_grads = COMPILED["reference C"](*INPUTS["C fp32"])
    for job, tolerance in (("pallas C bf16", 3e-2), ("pallas C fp32", 2e-3)):
        if job not in COMPILED:
            continue
        out, state, grads = COMPILED[job](*INPUTS[job.replace("pallas ", "")])
        errors = dict(out=relative_error(out, want_out), state=relative_error(state, want_state))
        errors.update({f"d{n}": relative_error(g, w) for n, g, w in
                       zip(("q", "k", "v", "g", "beta", "state0"), grads, want_grads)})
        bad = sorted(n for n, e in errors.items() if not e <= tolerance)
        result(stage="correct", job=job, documents=True, initial_state=True, tolerance=tolerance,
               status="PASS" if not bad else f"FAIL {bad}",
               **{n: f"{e:.2e}" for n, e in errors.items()})
    if "experts reference" in COMPILED:
        want_out, want_grads = COMPILED["experts reference"](*INPUTS["experts fp32"])
        for impl in GROUPED:
            if f"experts {impl}" not in COMPILED:
                continue
            out, grads = COMPILED[f"experts {impl}"](*INPUTS["experts bf16"])
            errors = dict(out=relative_error(out, want_out), d_rows=relative_error(grads[0], want_grads[0]),
                          d_weights=relative_error(grads[1], want_grads[1]))
            bad = sorted(n for n, e in errors.items() if not e <= 3e-2)
            result(stage="correct", job=f"grouped matmul {impl} (bf16 vs tiled fp32)",
                   status="PASS" if not bad else f"FAIL {bad}",
                   **{n: f"{e:.2e}" for n, e in errors.items()})


def attention_correct():
    for label in ("row", "shard"):
        if f"attention reference {label}" not in COMPILED:
            continue
        want_out, want_grads = COMPILED[f"attention reference {label}"](
            *INPUTS[f"attention {label} fp32"])
        for impl in ATTENTION_IMPLS:
            job = f"attention {impl} {label}"
            if job not in COMPILED:
                continue
            out, grads = COMPILED[job](*INPUTS[f"attention {label} bf16"])
            errors = dict(out=relative_error(out, want_out))
            errors.update({f"d{n}": relative_error(g, w) for n, g, w in zip("qkv", grads, want_grads)})
            bad = sorted(n for n, e in errors.items() if not e <= 3e-2)
            result(stage="attention", job=f"{impl} {label} (bf16 vs blockwise fp32)",
                   documents="3 a row, a reused id", status="PASS" if not bad else f"FAIL {bad}",
                   **{n: f"{e:.2e}" for n, e in errors.items()})


def attention_speed():
    for size in ("recipe", "long"):
        batch, length = A[size]
        forward_flops, backward_flops = causal_flops(batch, length, A["heads"], A["dim"])
        for impl in ATTENTION_IMPLS:
            for mode, flops in (("fwd", forward_flops), ("fwd+bwd", forward_flops + backward_flops)):
                job = f"attention {impl} {mode} {size}"
                if job in COMPILED:
                    times = timing(COMPILED[job], INPUTS[f"attention {size}"])
                    result(stage="attention speed", impl=impl, mode=mode, batch=batch,
                           length=length, heads=(A["heads"], A["kv_heads"]), dim=A["dim"],
                           documents=impl != "cudnn", **times,
                           tflops=round(flops / (times["median_ms"] * 1e-3) / 1e12, 2))


def speed(shape):
    forward_flops, backward_flops = chunked_flops(*SHAPES[shape])
    for impl in ("pallas", "chunked"):
        for mode, flops in (("fwd", forward_flops), ("fwd+bwd", forward_flops + backward_flops)):
            job = f"{impl} {mode} {shape}"
            if job in COMPILED:
                times = timing(COMPILED[job], INPUTS[shape])
                result(stage="speed", impl=impl, mode=mode, shape=SHAPES[shape], **times,
                       tflops=round(flops / (times["median_ms"] * 1e-3) / 1e12, 2))


def kernel_breakdown():
    if not all(f"kernel {name}" in COMPILED for name in CHAIN):
        return
    used = walk_chain(dict(KERNEL_VALUES), CHAIN,
                      lambda name, _, inputs: COMPILED[f"kernel {name}"](*inputs))
    for name in CHAIN:
        result(stage="kernels", kernel=name, shape=SHAPES["A"],
               **timing(COMPILED[f"kernel {name}"], used[name]))


def experts_speed():
    for impl in GROUPED:
        if f"experts {impl}" in COMPILED:
            e = EXPERTS
            flops = 3 * 2 * e["rows"] * e["hidden"] * e["width"]  # forward + two gradients
            times = timing(COMPILED[f"experts {impl}"], INPUTS["experts bf16"])
            result(stage="experts", impl=impl, **EXPERTS, **times,
                   tflops=round(flops / (times["median_ms"] * 1e-3) / 1e12, 2))


def recipe():
    if "recipe" not in COMPILED:
        return
    config, trainer, batch, _ = RECIPE_PARTS
    step = COMPILED["recipe"]
    state = trainer.init()
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    steps, start = (2 if DRY else 5), time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    rows, length = RECIPE_BATCH
    flops = config.training_flops_per_token(length) * rows * length
    peak = peak_tflops_per_device(jax.devices()[0].device_kind)
    result(stage="recipe", config=RECIPE, batch=RECIPE_BATCH, compile_s=COMPILE_S["recipe"],
           step_ms=round(seconds * 1e3, 1), tokens_per_s=round(rows * length / seconds),
           model_tflops=round(flops / seconds / 1e12, 2),
           mfu=None if peak is None else round(flops / seconds / (peak * 1e12), 3),
           loss=float(metrics["loss"]))


STAGES = (("correct", correct), ("attention", attention_correct), ("speed A", lambda: speed("A")),
          ("recipe", recipe), ("attention speed", attention_speed), ("experts", experts_speed),
          ("kernels", kernel_breakdown), ("speed B", lambda: speed("B")))
for label, stage in STAGES:
    if time.time() - T0 > args.budget_s:
        result(stage=label, status="skipped (over the time budget)")
        continue
    log(f"=== {label}")
    try:
        stage()
    except Exception as error:  # one stage's failure must not cost the others
        log(f"STAGE {label} FAILED: {error_text(error)}")
        result(stage=label, status="failed", error=error_text(error, 700))
failed = [r for r in RESULTS if "FAIL" in str(r.get("status", "")) or r.get("status") == "failed"
          or "error" in r]
log(f"done: {len(RESULTS)} results, {len(failed)} failures")
sys.exit(1 if failed else 0)
