"""The training batch: token ids, next-token targets and the masks of packed rows."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Batch(NamedTuple):
    """All fields [B, T]. Segment 0 is padding; other ids number the documents of a row."""

    input_ids: jnp.ndarray  # int32
    targets: jnp.ndarray  # int32, the token after each input token
    loss_mask: jnp.ndarray  # float32, 1 where the target counts (same document, not padding)
    segment_ids: jnp.ndarray  # int32
    positions: jnp.ndarray  # int32, restart at 0 in every document

    @property
    def valid(self):
        """Tokens that are not padding: counted in the router statistics."""
        return self.segment_ids != 0


def batch_from_packed_rows(tokens, segment_ids=None, assistant_mask=None) -> Batch:
    """Rows of T+1 packed tokens [B, T+1] (numpy) -> a Batch of length T.

    A target counts only where it continues the input token's document, so no document is
    trained to predict its neighbour's first token; with `assistant_mask` [B, T+1] (supervised
    fine-tuning) only where the target is one of the assistant's tokens.
    """
    tokens = np.asarray(tokens, np.int32)
    if segment_ids is None:
        segment_ids = np.ones_like(tokens)
    segment_ids = np.asarray(segment_ids, np.int32)
    inputs, following = segment_ids[:, :-1], segment_ids[:, 1:]
    loss_mask = (following == inputs) & (inputs != 0)
    if assistant_mask is not None:
        loss_mask &= np.asarray(assistant_mask)[:, 1:] != 0
    loss_mask = loss_mask.astype(np.float32)
    return Batch(
        input_ids=tokens[:, :-1],
        targets=tokens[:, 1:],
        loss_mask=loss_mask,
        segment_ids=inputs,
        positions=positions_from_segments(inputs),
    )


def positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... restarting wherever the segment id changes along a row."""
    segment_ids = np.asarray(segment_ids)
    length = segment_ids.shape[-1]
    index = np.broadcast_to(np.arange(length, dtype=np.int32), segment_ids.shape)
    starts = np.concatenate(
        [np.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]],
        axis=-1,
    )
    start_index = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return (index - start_index).astype(np.int32)
