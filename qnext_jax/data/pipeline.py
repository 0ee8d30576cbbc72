"""The grain pipeline: packed rows -> shuffled, per-process batches with checkpointable state.

Rows come from memory (a corpus tokenized at start-up) or from ArrayRecord shards written by
`python -m qnext_jax.data prepare` (corpora too large to tokenize on the fly). The pipeline is
index-based (`grain.MapDataset`): shuffled by seed, reshuffled every epoch, and process p of P
reads only rows p, p+P, p+2P, ... of that order. Its whole state is one position, saved with
each checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import grain
import numpy as np

from qnext_jax.data.sources import DataError
from qnext_jax.data.batch import Batch, batch_from_packed_rows

METADATA_FILE = "rows.json"


class InMemoryRows:
    """Random access to packed rows held as two [R, L] arrays."""

    def __init__(self, tokens: np.ndarray, segment_ids: np.ndarray):
        self.tokens, self.segment_ids = tokens, segment_ids

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index):
        return self.tokens[index], self.segment_ids[index]


class ArrayRecordRows:
    """Random access to the rows of a directory written by `write_array_record_rows`."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        meta_path = directory / METADATA_FILE
        if not meta_path.is_file():
            raise DataError(f"{directory} holds no prepared rows ({METADATA_FILE} is missing); "
                            "write them with `python -m qnext_jax.data prepare`")
        self.metadata = json.loads(meta_path.read_text())
        shards = [str(directory / name) for name in self.metadata["shards"]]
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise DataError(f"prepared rows in {directory}: shard files missing: {missing}")
        self.row_length = int(self.metadata["row_length"])
        self.source = grain.sources.ArrayRecordDataSource(shards)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        row = np.frombuffer(self.source[index], np.int32)
        return row[: self.row_length], row[self.row_length:]


def write_array_record_rows(directory: str | Path, tokens: np.ndarray, segment_ids: np.ndarray,
                            *, rows_per_shard: int = 65_536, extra_metadata=None) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(tokens), rows_per_shard):
        name = f"rows-{len(shards):05d}.array_record"
        writer = ArrayRecordWriter(str(directory / name), "group_size:1")
        for row in range(start, min(start + rows_per_shard, len(tokens))):
            writer.write(np.concatenate([tokens[row], segment_ids[row]]).astype(np.int32).tobytes())
        writer.close()
        shards.append(name)
    metadata = {"row_length": int(tokens.shape[1]), "rows": int(len(tokens)), "shards": shards}
    metadata.update(extra_metadata or {})
    # Written last: a directory without it is an interrupted `prepare`, never read as complete.
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=1))


def batch_dataset(rows, batch_rows: int, *, seed: int, process_index: int = 0,
                  process_count: int = 1, shuffle: bool = True, repeat: bool = True):
    """A grain IterDataset of `Batch`es of this process's `batch_rows` rows."""
    if len(rows) < batch_rows * process_count:
        raise DataError(
            f"the data has {len(rows)} rows, fewer than one global batch "
            f"({batch_rows} rows x {process_count} processes)"
        )
    dataset = grain.MapDataset.source(rows)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset[process_index::process_count].batch(batch_rows, drop_remainder=True)
    return dataset.map(_to_batch).to_iter_dataset()


def _to_batch(rows) -> Batch:
    tokens, segment_ids = rows
    return batch_from_packed_rows(tokens, segment_ids)
