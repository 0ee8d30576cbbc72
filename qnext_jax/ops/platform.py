"""The platform the traced computation is for, which every `auto` kernel choice follows.

Normally the backend jax computes on. `lowering_for("cuda")` overrides it while a function is
traced, so that a CPU machine can lower the GPU or TPU program (the Pallas Triton/Mosaic
kernels, splash attention, `ragged_dot`) with `jax.export` or `.lower(lowering_platforms=...)`
and check that it lowers. jit caches a function's trace, so trace a fresh jit inside it.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

_PLATFORMS = {"cpu": "cpu", "tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("qnext_target", default=None)


def target_platform() -> str:
    """'cpu', 'gpu' or 'tpu'."""
    return _override.get() or _PLATFORMS.get(jax.default_backend(), jax.default_backend())


def running_on(platform: str) -> bool:
    """True when the backend jax computes on is `platform` ('cpu', 'gpu' or 'tpu'), not a
    platform a CPU machine is lowering for."""
    return _PLATFORMS.get(jax.default_backend(), jax.default_backend()) == platform


@contextlib.contextmanager
def lowering_for(platform: str):
    """Traces inside take their kernel choices for `platform` (cpu, cuda/gpu/rocm, tpu)."""
    if platform not in _PLATFORMS:
        raise ValueError(f"platform must be one of {sorted(_PLATFORMS)}, got {platform!r}")
    token = _override.set(_PLATFORMS[platform])
    try:
        yield
    finally:
        _override.reset(token)


def let_tokamax_read_its_flags():
    """tokamax reads absl flags, which would parse our command line (not absl's) on first use
    and stop at its first option: let it take its defaults. Called before any tokamax op."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
