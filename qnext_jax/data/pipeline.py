"""The grain pipeline: packed rows -> shuffled, per-process batches with checkpointable state.

Rows come from memory (a corpus tokenized at start-up) or from ArrayRecord shards written by
`python -m qnext_jax.data prepare` (corpora too large to tokenize on the fly). The pipeline is
index-based (`grain.MapDataset`): shuffled by seed, reshuffled every epoch, and global batch b
is rows bB .. bB+B-1 of that order whatever the processes. A process reads only the rows of
each global batch that its devices hold (`parallel.distributed.process_rows`): processes whose
devices split the same rows over `sequence` or `tensor` read the same rows. Its whole state is
one position, saved with each checkpoint, so a resumed run sees exactly the batches it would
have seen.
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
    """Random access to packed rows held as [R, L] arrays: tokens, segment ids and, for
    conversations, the mask of the assistant's tokens."""

    def __init__(self, tokens: np.ndarray, segment_ids: np.ndarray,
                 assistant_mask: np.ndarray | None = None):
        self.tokens, self.segment_ids, self.assistant_mask = tokens, segment_ids, assistant_mask

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index):
        if self.assistant_mask is None:
            return self.tokens[index], self.segment_ids[index]
        return self.tokens[index], self.segment_ids[index], self.assistant_mask[index]


class ArrayRecordRows:
    """Random access to the rows of a directory written by `python -m qnext_jax.data prepare`
    (its manifest, rows.json, lists the ArrayRecord files in order)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory).expanduser().absolute()
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
        self.format = self.metadata.get("format", "text")  # chat rows carry the assistant mask
        if not shards:
            raise DataError(f"prepared rows in {directory} are empty (no document of the corpus "
                            "fell in this split)")
        self.source = grain.sources.ArrayRecordDataSource(shards)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        """(tokens, segment ids) or, for conversations, (tokens, segment ids, assistant mask)."""
        row = np.frombuffer(self.source[index], np.int32)
        return tuple(row.reshape(-1, self.row_length))


class ArrayRecordRowWriter:
    """Writes packed rows to one ArrayRecord file as they come; the file appears under its
    name only when closed complete (it is written beside it as `.partial`)."""

    def __init__(self, path: str | Path):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._writer = ArrayRecordWriter(str(self._partial), "group_size:1")

    def write(self, tokens: np.ndarray, segment_ids: np.ndarray,
              assistant_mask: np.ndarray | None = None) -> None:
        fields = [tokens, segment_ids] + ([] if assistant_mask is None else [assistant_mask])
        for row in np.concatenate(fields, axis=1).astype(np.int32):
            self._writer.write(row.tobytes())

    def close(self) -> None:
        self._writer.close()
        self._partial.replace(self.path)


class MixedRows:
    """Rows drawn from several corpora in fixed proportions (`weights`, normalised): grain's
    deterministic mixing of the components, each shuffled and repeated on its own, so a mixture
    is reproducible from its seed and resumes exactly from one position like a single corpus.
    Its length is the rows mixed before the first component runs out (evaluation)."""

    def __init__(self, components, weights):
        if len(components) != len(weights) or not components:
            raise DataError(f"a mixture needs one weight per corpus: {len(components)} corpora, "
                            f"{len(weights)} weights")
        if any(not w > 0 for w in weights):
            raise DataError(f"mixture weights must be positive, got {list(weights)}")
        empty = [i for i, c in enumerate(components) if len(c) == 0]
        if empty:
            raise DataError(f"mixture corpora {empty} have no rows")
        total = float(sum(weights))
        self.components, self.weights = list(components), [w / total for w in weights]

    def __len__(self) -> int:
        ranges = [grain.MapDataset.range(len(c)) for c in self.components]
        return len(grain.MapDataset.mix(ranges, self.weights))


def _rows_dataset(rows, seed: int, shuffle: bool, repeat: bool):
    if isinstance(rows, MixedRows):
        parts = [_rows_dataset(c, seed + i, shuffle, repeat) for i, c in enumerate(rows.components)]
        return grain.MapDataset.mix(parts, rows.weights)
    dataset = grain.MapDataset.source(rows)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    if repeat:
        dataset = dataset.repeat()
    return dataset


class RowsOfBatches:
    """Random access to the rows `held` (global row indices, ascending) of every global batch
    of `batch_rows` consecutive items of `dataset`: item i is row held[i % h] of batch i // h."""

    def __init__(self, dataset, batch_rows: int, held):
        self.dataset, self.batch_rows = dataset, batch_rows
        self.held = [int(r) for r in held]

    def __len__(self) -> int:
        return len(self.dataset) // self.batch_rows * len(self.held)

    def __getitem__(self, index):
        batch, row = divmod(index, len(self.held))
        return self.dataset[batch * self.batch_rows + self.held[row]]


def batch_dataset(rows, batch_rows: int, *, seed: int, held_rows=None, shuffle: bool = True,
                  repeat: bool = True):
    """A grain IterDataset of `Batch`es: of global batches of `batch_rows` rows, the rows
    `held_rows` (global row indices; default: all of them)."""
    if len(rows) < batch_rows:
        raise DataError(f"the data has {len(rows)} rows, fewer than one global batch "
                        f"({batch_rows} rows)")
    held = range(batch_rows) if held_rows is None else held_rows
    dataset = _rows_dataset(rows, seed, shuffle, repeat)
    dataset = grain.MapDataset.source(RowsOfBatches(dataset, batch_rows, held))
    dataset = dataset.batch(len(held), drop_remainder=True)
    return dataset.map(_to_batch).to_iter_dataset()


def _to_batch(rows) -> Batch:
    return batch_from_packed_rows(*rows)
