"""Packing documents into fixed-length rows with segment ids.

Documents (each ending in end-of-text) are laid end to end and cut into rows of `row_length`
tokens (T + 1: T inputs and the target of the last). Every row numbers its pieces 1, 2, ...;
a document cut by a row boundary continues as segment 1 of the next row. No padding is needed
except in the last row, whose tail is segment 0.
"""

from __future__ import annotations

import numpy as np

from qnext_jax.data.sources import DataError


def pack_documents(documents: list[list[int]], row_length: int):
    """-> (tokens [R, row_length] int32, segment_ids [R, row_length] int32)."""
    if row_length < 2:
        raise DataError(f"row length must be >= 2, got {row_length}")
    lengths = np.array([len(d) for d in documents], np.int64)
    if lengths.sum() == 0:
        raise DataError("the corpus has no tokens")
    stream = np.concatenate([np.asarray(d, np.int32) for d in documents if len(d)])
    document_index = np.repeat(np.arange(len(documents)), lengths)
    rows = -(-len(stream) // row_length)
    padded = rows * row_length
    tokens = np.zeros(padded, np.int32)
    tokens[: len(stream)] = stream
    owner = np.full(padded, -1, np.int64)
    owner[: len(stream)] = document_index
    tokens, owner = tokens.reshape(rows, row_length), owner.reshape(rows, row_length)
    # Segment ids: 1 + the number of document changes so far within the row; padding is 0.
    changes = np.concatenate([np.zeros((rows, 1), np.int64), np.diff(owner, axis=1) != 0], axis=1)
    segments = (1 + np.cumsum(changes, axis=1)).astype(np.int32)
    segments[owner < 0] = 0
    return tokens, segments
