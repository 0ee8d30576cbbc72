"""The machines a run can be planned for, by name: their chips, how many, and what the compiler
needs to build compile-only devices of them on any machine.

GPUs: XLA:GPU compiles for a `GpuTargetConfigProto` (the device description it would otherwise
read from the driver); `GpuChip.target_config()` writes one from the data-sheet figures below.
TPUs: libtpu builds the devices of a named topology (`v5p:4x4x4`) itself.

Names follow the clouds' and MaxText's: `v5p-128` counts TensorCores (64 chips), `v5e-8` and
`v6e-256` count chips. GPU names are one GPU (`h100`) or one host of eight (`h100x8`);
`--hosts N` repeats a GPU host and `--slices N` a TPU slice.
"""

from __future__ import annotations

import dataclasses
import difflib

from qnext_jax.config import ConfigError

GiB = 1024 ** 3


class UnknownTarget(ConfigError):
    pass


@dataclasses.dataclass(frozen=True)
class GpuChip:
    """What XLA:GPU reads of a device: compute capability, SMs, shared memory, registers,
    clocks, memory size and bandwidth (vendor data sheets, SXM parts)."""
    description: str
    compute_capability: tuple[int, int]
    sm_count: int
    fp32_cores_per_sm: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    l2_cache: int
    clock_ghz: float
    memory: int
    bandwidth: float  # bytes/s
    peak_bf16_flops: float  # dense

    def target_config(self) -> str:
        """The GpuTargetConfigProto in text form, for the CUDA runtime jax's plugin ships
        (CUDA 12.9, cuDNN 9.8 with jax 0.10)."""
        major, minor = self.compute_capability
        return "\n".join([
            "gpu_device_info {",
            "  threads_per_block_limit: 1024",
            "  threads_per_warp: 32",
            "  shared_memory_per_block: 49152",
            f"  shared_memory_per_core: {self.shared_memory_per_sm}",
            "  threads_per_core_limit: 2048",
            f"  core_count: {self.sm_count}",
            f"  fpus_per_core: {self.fp32_cores_per_sm}",
            "  block_dim_limit_x: 2147483647",
            "  block_dim_limit_y: 65535",
            "  block_dim_limit_z: 65535",
            f"  memory_bandwidth: {int(self.bandwidth)}",
            f"  l2_cache_size: {self.l2_cache}",
            f"  clock_rate_ghz: {self.clock_ghz}",
            f"  device_memory_size: {self.memory}",
            f"  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}",
            f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
            "  registers_per_core_limit: 65536",
            "  registers_per_block_limit: 65536",
            "}",
            'platform_name: "CUDA"',
            "dnn_version_info { major: 9 minor: 8 }",
            "runtime_version { major: 12 minor: 9 patch: 0 }",
            f'device_description_str: "{self.description}"',
        ])


GPU_CHIPS = {
    "h100": GpuChip("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 233472, 232448, 50 * 2 ** 20,
                    1.98, 84929347584, 3.35e12, 989e12),
    "h200": GpuChip("NVIDIA H200", (9, 0), 132, 128, 233472, 232448, 50 * 2 ** 20,
                    1.98, 150754820096, 4.8e12, 989e12),
    "a100": GpuChip("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 167936, 166912, 40 * 2 ** 20,
                    1.41, 85198045184, 2.039e12, 312e12),
    "b200": GpuChip("NVIDIA B200", (10, 0), 148, 128, 233472, 232448, 126 * 2 ** 20,
                    1.965, 192265846784, 8.0e12, 2250e12),
}


@dataclasses.dataclass(frozen=True)
class TpuChip:
    generation: str  # libtpu's topology prefix
    memory: int  # HBM a chip that programs may use: the TPU compiler's own limit ("available
    # HBM" in its out-of-memory error), where measured; the data sheet's for v4
    bandwidth: float
    peak_bf16_flops: float
    cores_in_name: int  # TensorCores a chip counted by the slice name (v4/v5p: 2)
    topologies: dict[int, str]  # chips -> topology


TPU_CHIPS = {
    "v4": TpuChip("v4", 32 * GiB, 1.228e12, 275e12, 2,
                  {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
                   128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}),
    "v5p": TpuChip("v5p", int(95.74 * GiB), 2.765e12, 459e12, 2,
                   {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
                    128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}),
    "v5e": TpuChip("v5e", int(15.75 * GiB), 0.819e12, 197e12, 1,
                   {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8",
                    128: "8x16", 256: "16x16"}),
    "v6e": TpuChip("v6e", int(31.25 * GiB), 1.64e12, 918e12, 1,
                   {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8",
                    128: "8x16", 256: "16x16"}),
}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "cuda" or "tpu"
    chips: int  # devices in all
    memory: int  # bytes of device memory a chip
    bandwidth: float  # bytes/s a chip
    peak_flops: float  # dense bf16 FLOP/s a chip
    gpu: GpuChip | None = None
    gpu_topology: str = ""  # "hosts x 1 x gpus a host", as jax's GPU topologies spell it
    tpu_topology: str = ""  # "v5p:4x4x4"
    slices: int = 1

    def describe(self) -> str:
        if self.platform == "cuda":
            return f"{self.chips} x {self.gpu.description}"
        return (f"{self.name} ({self.chips} chips, {self.tpu_topology}"
                f"{f', {self.slices} slices' if self.slices > 1 else ''})")


def known_targets() -> list[str]:
    names = []
    for gpu in GPU_CHIPS:
        names += [gpu, f"{gpu}x8"]
    for chip in TPU_CHIPS.values():
        names += [f"{chip.generation}-{chips * chip.cores_in_name}" for chips in chip.topologies]
    return names


def get_target(name: str, *, hosts: int = 1, slices: int = 1) -> Target:
    """The target called `name`; `hosts` GPU hosts (of `name`'s GPUs) or `slices` TPU slices."""
    if hosts < 1 or slices < 1:
        raise ConfigError(f"--hosts and --slices must be >= 1, got {hosts} and {slices}")
    key = name.lower()
    gpu, _, per_host = key.partition("x")
    if gpu in GPU_CHIPS and per_host in ("", "8"):
        if slices != 1:
            raise ConfigError(f"--slices is for TPU targets; {name} is a GPU target (use --hosts)")
        gpus = int(per_host or 1)
        if hosts > 1 and gpus == 1:
            raise ConfigError(f"--hosts {hosts} needs a host of eight GPUs: {gpu}x8")
        chip = GPU_CHIPS[gpu]
        return Target(name=key if hosts == 1 else f"{hosts}x{key}", platform="cuda",
                      chips=hosts * gpus, memory=chip.memory, bandwidth=chip.bandwidth,
                      peak_flops=chip.peak_bf16_flops, gpu=chip,
                      gpu_topology=f"{hosts}x1x{gpus}")
    generation, _, count = key.partition("-")
    chip = TPU_CHIPS.get(generation)
    if chip is not None and count.isdigit() and int(count) % chip.cores_in_name == 0 \
            and int(count) // chip.cores_in_name in chip.topologies:
        if hosts != 1:
            raise ConfigError(f"--hosts is for GPU targets; {name} is a TPU slice (use --slices)")
        chips = int(count) // chip.cores_in_name
        return Target(name=key if slices == 1 else f"{slices}x{key}", platform="tpu",
                      chips=chips * slices, memory=chip.memory, bandwidth=chip.bandwidth,
                      peak_flops=chip.peak_bf16_flops,
                      tpu_topology=f"{chip.generation}:{chip.topologies[chips]}", slices=slices)
    known = known_targets()
    close = difflib.get_close_matches(key, known, n=1)
    raise UnknownTarget(f"unknown target {name!r}{f' (did you mean {close[0]}?)' if close else ''}"
                        f"; known targets: {', '.join(known)}")
