"""The device mesh: five named axes sized by the config, checked against the devices at hand.

  data      pure data parallelism (parameters replicated)
  fsdp      data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  expert    data parallelism for the dense parts, expert parallelism inside the MoE
  sequence  context parallelism: each row's tokens split over devices (parallel/context_parallel)
  tensor    tensor parallelism over attention / DeltaNet heads and MLP widths

`sequence` sits next to `tensor`, the innermost axis, so that both land on the fastest links
(the halo and state exchanges of context parallelism are small; tensor parallelism's are not).

Every axis is `AxisType.Auto` (GSPMD propagation between the annotated points); JAX 0.10 would
default to Explicit, so the types are always passed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from qnext_jax.config import ConfigError, check_known_keys

MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")
# The axes the rows of a batch are split over; `sequence` splits each row's tokens, and tensor
# ranks share their tokens.
BATCH_AXES = ("data", "fsdp", "expert")
# The axes tokens are split over: a flattened [rows * length] token axis is sharded over these.
TOKEN_AXES = BATCH_AXES + ("sequence",)


class MeshError(ConfigError):
    """A mesh that cannot be built for these devices or this model; the message says why."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; at most one may be -1, meaning "all remaining devices"."""

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    sequence: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = self.as_dict()
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise MeshError(f"mesh.{name} must be a positive size or -1, got {size}")
        if sum(size == -1 for size in sizes.values()) > 1:
            wildcard = [name for name, size in sizes.items() if size == -1]
            raise MeshError(f"only one mesh axis may be -1, got {wildcard}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MeshConfig:
        check_known_keys(values, cls, "mesh")
        return cls(**{name: int(size) for name, size in values.items()})

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_AXES}

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with the -1 filled in; their product must be the device count."""
        sizes = self.as_dict()
        fixed = math.prod(size for size in sizes.values() if size != -1)
        for name, size in sizes.items():
            if size == -1:
                if num_devices % fixed:
                    raise MeshError(
                        f"mesh {self._describe()} cannot fill {num_devices} devices: the fixed "
                        f"axes multiply to {fixed}, which does not divide {num_devices}"
                    )
                sizes[name] = num_devices // fixed
        if math.prod(sizes.values()) != num_devices:
            raise MeshError(
                f"mesh {self._describe()} has {math.prod(sizes.values())} devices but "
                f"{num_devices} are available; make the product equal or set one axis to -1"
            )
        return sizes

    def _describe(self) -> str:
        return "{" + ", ".join(f"{k}: {v}" for k, v in self.as_dict().items()) + "}"


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """A concrete mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    try:
        sizes = config.resolve(len(devices))
    except MeshError as error:
        if devices[0].platform != "cpu":
            raise
        raise MeshError(f"{error} (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
                        "set before the program starts gives N devices)") from None
    shape = tuple(sizes[name] for name in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if devices == jax.devices() or devices[0].platform != "cpu":
        # make_mesh orders devices for the physical topology (ICI rings, NVLink islands): the
        # local devices, or a compile-only topology's (qnext_jax.plan).
        try:
            return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
        except (NotImplementedError, ValueError, AssertionError):
            # mesh_utils knows no physical order for this topology (a multi-slice or
            # multi-host compile-only one, say): keep the order the devices are listed in.
            pass
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def make_abstract_mesh(config: MeshConfig, num_devices: int) -> AbstractMesh:
    """A mesh of `num_devices` that need not exist: for lowering and memory planning."""
    sizes = config.resolve(num_devices)
    return AbstractMesh(tuple(sizes[name] for name in MESH_AXES), MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_size(mesh: Mesh | AbstractMesh, name: str) -> int:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))[name] if name in mesh.axis_names else 1


def batch_shards(mesh: Mesh | AbstractMesh) -> int:
    return math.prod(axis_size(mesh, name) for name in BATCH_AXES)
