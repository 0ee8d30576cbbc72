"""qnext_jax/host_memory.py: a CPU computation's temporaries stay mapped from one run to the next.

The reference is the kernel's own count of the pages it mapped in (getrusage's minor faults):
a computation whose 128 MiB temporary is mapped afresh faults ~32,000 pages per run.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from qnext_jax import host_memory

TEMPORARY_PAGES = 8192 * 4096 * 4 // 4096  # the [8192, 4096] fp32 product below, in 4 KiB pages

SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from qnext_jax.host_memory import reuse_cpu_step_memory
    changed = reuse_cpu_step_memory()
    import jax, jax.numpy as jnp

    @jax.jit
    def two_products(x, w, v):
        return (x @ w) @ v  # the inner product is a temporary: the outer one reads all of it

    x = jnp.ones((8192, 64), jnp.float32)
    w = jnp.ones((64, 4096), jnp.float32) / 64
    v = jnp.ones((4096, 8), jnp.float32)
    temp = two_products.lower(x, w, v).compile().memory_analysis().temp_size_in_bytes
    for _ in range(3):  # the first runs map the memory in any case (and settle the heap)
        two_products(x, w, v).block_until_ready()
    faults = []
    for _ in range(7):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        two_products(x, w, v).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    faults = sorted(faults)[len(faults) // 2]  # the median run: now and then one maps afresh
    print(json.dumps({"changed": changed, "temp_bytes": temp, "faults_per_run": faults}))
""")


def run_script(tmp_path, keep_allocator: bool) -> dict:
    script = tmp_path / "reuse.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["JAX_PLATFORMS"] = "cpu"
    if keep_allocator:
        env[host_memory.OPT_OUT] = "1"
    else:
        env.pop(host_memory.OPT_OUT, None)
    completed = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                               text=True, timeout=300, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="the allocator settings are glibc's")
def test_the_temporaries_are_mapped_once_not_on_every_run(tmp_path):
    stock = run_script(tmp_path, keep_allocator=True)
    reused = run_script(tmp_path, keep_allocator=False)
    assert stock["temp_bytes"] >= TEMPORARY_PAGES * 4096  # the product is a temporary
    assert not stock["changed"] and reused["changed"]
    # Stock glibc maps the temporary afresh on every run: the kernel faults in all its pages.
    assert stock["faults_per_run"] > 0.9 * TEMPORARY_PAGES, stock
    # Reused: the same pages serve every run.
    assert reused["faults_per_run"] < 0.02 * TEMPORARY_PAGES, reused


def test_refuses_once_the_backends_exist(monkeypatch):
    monkeypatch.delenv(host_memory.OPT_OUT, raising=False)
    jax.devices()  # this test process's backends are up
    with pytest.raises(RuntimeError, match="before JAX creates its backends"):
        host_memory.reuse_cpu_step_memory()


def test_opting_out_changes_nothing(monkeypatch):
    monkeypatch.setenv(host_memory.OPT_OUT, "1")
    assert host_memory.reuse_cpu_step_memory() is False
