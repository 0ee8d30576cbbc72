"""A Hugging Face checkpoint directory: config.json plus one or many *.safetensors files, read
one tensor at a time (memory-mapped), written in size-bounded shards with an index."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from qnext_jax.config import ConfigError

INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ConfigError):
    """A checkpoint directory is missing something or holds tensors that do not fit."""


class SafetensorsDir:
    """Maps tensor name -> file; reads headers (shape, dtype) without loading data."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).expanduser().absolute()
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        index = self.directory / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.directory}")
        self._handles = {}
        self.file_of: dict[str, str] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise CheckpointError(f"{INDEX_NAME} lists {name}, which is not in {self.directory}")
            handle = safe_open(str(path), framework="numpy")
            self._handles[name] = handle
            for key in handle.keys():
                self.file_of[key] = name

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handles[self.file_of[name]].get_slice(name).get_dtype()

    def read(self, name: str) -> np.ndarray:
        return self._handles[self.file_of[name]].get_tensor(name)


class ShardedWriter:
    """Writes tensors as they come into shards of at most `max_shard_bytes`, then the index."""

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int = 2 << 30):
        self.directory = Path(directory).expanduser().absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = np.ascontiguousarray(array)
        self._pending_bytes += array.nbytes
        self._total_bytes += array.nbytes

    def _flush(self) -> None:
        index = len(self._shards)
        save_file(self._pending, str(self.directory / f"shard-{index:05d}.safetensors"),
                  metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        total = len(self._shards)
        weight_map = {}
        for index, names in enumerate(self._shards):
            final = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self.directory / f"shard-{index:05d}.safetensors", self.directory / final)
            weight_map.update({name: final for name in names})
        index_data = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_NAME).write_text(json.dumps(index_data, indent=2, sort_keys=True))
