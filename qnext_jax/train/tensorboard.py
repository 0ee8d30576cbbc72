"""TensorBoard event files for scalar metrics, written without TensorFlow or TensorBoard.

An event file is a sequence of TFRecords (u64 length, masked CRC-32C of the length, payload,
masked CRC-32C of the payload), each payload an `Event` protocol buffer. Scalars only need four
fields, encoded here by hand:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
              SessionLog session_log = 7; }           SessionLog { Status status = 1; }
    Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }
"""

from __future__ import annotations

import math
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # int64 fields are encoded as their two's complement
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int | None = None, *, file_version: str | None = None,
           summary: bytes | None = None) -> bytes:
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)
    if step is not None:
        out += _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if summary is not None:
        out += _bytes_field(5, summary)
    return out


def _scalar_value(tag: str, value: float) -> bytes:
    payload = _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)
    return _bytes_field(1, payload)


def _record(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return (length + struct.pack("<I", _masked_crc(length)) + payload
            + struct.pack("<I", _masked_crc(payload)))


class EventWriter:
    """Appends scalar summaries to a new event file in `directory` (one file per writer, as
    TensorBoard expects; a resumed run adds a file and TensorBoard merges them by step)."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.qnext_jax"
        self.path, n = directory / name, 1
        while self.path.exists():  # TensorBoard reads the files in name order
            self.path, n = directory / f"{name}.{n}", n + 1
        self._file = self.path.open("ab")
        self._file.write(_record(_event(time.time(), file_version="brain.Event:2")))
        self._file.flush()

    def restart(self, step: int) -> None:
        """Marks a resumed run (SessionLog START at `step`): TensorBoard then drops the
        points at `step` and later that an interrupted run logged after its last checkpoint."""
        session_log = _varint(1 << 3 | 0) + _varint(1)  # SessionLog { status = START (1) }
        payload = (_varint(1 << 3 | 1) + struct.pack("<d", time.time()) + _varint(2 << 3 | 0)
                   + _varint(step) + _bytes_field(7, session_log))
        self._file.write(_record(payload))
        self._file.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = b"".join(_scalar_value(tag, float(value)) for tag, value in values.items()
                           if value is not None and math.isfinite(float(value)))
        self._file.write(_record(_event(time.time(), step, summary=summary)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
