"""Packing documents into fixed-length rows with segment ids.

Documents (each ending in end-of-text) are laid end to end and cut into rows of `row_length`
tokens (T + 1: T inputs and the target of the last). Every row numbers its pieces 1, 2, ...;
a document cut by a row boundary continues as segment 1 of the next row. No padding is needed
except in the last row, whose tail is segment 0.

`RowPacker` does this as a stream: documents go in a batch at a time and complete rows come
out, so memory holds one batch and one partial row, never the corpus. With `with_mask` every
document comes with a 0/1 mask over its tokens (the assistant's tokens of a conversation), packed
alongside as a third array of rows.
"""

from __future__ import annotations

import numpy as np

from qnext_jax.data.sources import DataError


class RowPacker:
    """Streaming packer: `add` a batch of documents, get the rows it completed; `finish` pads
    and returns the last partial row. Rows are (tokens [R, L] int32, segment_ids [R, L] int32)
    and, `with_mask`, the documents' masks [R, L] int32 (0 in padding)."""

    def __init__(self, row_length: int, with_mask: bool = False):
        if row_length < 2:
            raise DataError(f"row length must be >= 2, got {row_length}")
        self.row_length, self.with_mask = row_length, with_mask
        self._tokens = np.zeros(0, np.int32)  # the partial row: its tokens
        self._owner = np.zeros(0, np.int64)  # the document each belongs to
        self._mask = np.zeros(0, np.int32)  # and their mask
        self._documents = 0
        self.tokens_in = 0

    def add(self, documents, masks=None) -> tuple[np.ndarray, ...]:
        if self.with_mask != (masks is not None):
            raise ValueError("masks go with every batch of a packer made with_mask, and only then")
        documents = [np.asarray(d, np.int32) for d in documents]
        if masks is not None:
            masks = [np.asarray(m, np.int32) for m in masks]
            if len(masks) != len(documents) or any(map(lambda d, m: len(d) != len(m),
                                                       documents, masks)):
                raise ValueError("every document needs a mask of its length")
        lengths = np.array([len(d) for d in documents], np.int64)
        # Empty documents take no segment number (they own no token).
        owner = self._documents + np.repeat(np.cumsum(lengths > 0) - 1, lengths)
        self._documents += int(np.sum(lengths > 0))
        self.tokens_in += int(lengths.sum())
        tokens = np.concatenate([self._tokens, *documents])
        owner = np.concatenate([self._owner, owner])
        mask = np.concatenate([self._mask, *masks]) if self.with_mask else None
        full = len(tokens) // self.row_length * self.row_length
        self._tokens, self._owner = tokens[full:], owner[full:]
        if self.with_mask:
            self._mask, mask = mask[full:], mask[:full]
        return self._rows(tokens[:full], owner[:full], mask)

    def finish(self) -> tuple[np.ndarray, ...]:
        """The partial row padded with token 0 in segment 0 (no rows if there is none)."""
        pad = (-len(self._tokens)) % self.row_length
        tokens = np.concatenate([self._tokens, np.zeros(pad, np.int32)])
        owner = np.concatenate([self._owner, np.full(pad, -1, np.int64)])
        mask = np.concatenate([self._mask, np.zeros(pad, np.int32)])
        self._tokens, self._owner = np.zeros(0, np.int32), np.zeros(0, np.int64)
        self._mask = np.zeros(0, np.int32)
        return self._rows(tokens, owner, mask if self.with_mask else None)

    def _rows(self, tokens, owner, mask=None):
        rows = len(tokens) // self.row_length
        tokens = tokens.reshape(rows, self.row_length)
        owner = owner.reshape(rows, self.row_length)
        # Segment ids: 1 + the number of document changes so far within the row; padding is 0.
        changes = np.concatenate([np.zeros((rows, 1), np.int64), np.diff(owner, axis=1) != 0],
                                 axis=1)
        segments = (1 + np.cumsum(changes, axis=1)).astype(np.int32)
        segments[owner < 0] = 0
        if mask is not None:
            return tokens, segments, mask.reshape(rows, self.row_length)
        return tokens, segments

