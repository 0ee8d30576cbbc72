"""Packed-sequence bookkeeping shared by the ops: which tokens belong to the same document."""

import jax.numpy as jnp


def document_index(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """[B, T] -> [B, T] int32 that counts the document boundaries seen so far in each row.

    Two tokens share a document iff their indices are equal. Unlike raw segment ids this stays
    right when a row reuses an id for a later, separate document (ids 1, 1, 2, 1 are three
    documents), and it is monotone, which the chunked delta rule relies on.
    """
    starts = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = jnp.concatenate([jnp.zeros_like(starts[:, :1]), starts], axis=1)
    return jnp.cumsum(starts.astype(jnp.int32), axis=1)
