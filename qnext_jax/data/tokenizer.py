"""Tokenizers: a Hugging Face `tokenizer.json` (the real Qwen tokenizer for continued
pretraining), or the project's default — a byte-level BPE trained on the training split."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qnext_jax.data.sources import DataError

END_OF_TEXT = "<|endoftext|>"  # Qwen's document separator, also ours


class TextTokenizer:
    """Encodes documents to ids; every document is followed by the end-of-text id."""

    def __init__(self, tokenizer: Tokenizer, source: str):
        self.tokenizer = tokenizer
        self.source = source
        end = tokenizer.token_to_id(END_OF_TEXT)
        if end is None:
            raise DataError(f"tokenizer {source} has no {END_OF_TEXT!r} token to separate documents")
        self.end_of_text_id = end

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        # The batch encoder without offsets (encode_batch_fast): every core, less memory.
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids + [self.end_of_text_id] for e in encodings]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def save(self, path: Path) -> None:
        """Atomically: a reader (a resumed run, another process) never sees half a file, and
        writers at the same time (the workers of a prepare) each write a file of their own."""
        path = Path(path)
        descriptor, partial = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
        os.close(descriptor)
        self.tokenizer.save(partial)
        os.replace(partial, path)

    def fingerprint(self) -> str:
        """A short hash of the whole tokenizer (vocabulary, merges, normalisation, specials)."""
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()[:16]


def load_tokenizer(path: str | Path) -> TextTokenizer:
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist (expected a tokenizer.json)")
    try:
        return TextTokenizer(Tokenizer.from_file(str(path)), str(path))
    except Exception as error:  # the tokenizers library raises bare Exceptions
        raise DataError(f"cannot read tokenizer {path}: {error}") from None


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """GPT-2-style byte-level BPE: any text encodes (no unknown token); deterministic."""
    if vocab_size < 257 + 1:
        raise DataError(f"vocab_size {vocab_size} is too small for a byte-level BPE (>= 258)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return TextTokenizer(tokenizer, f"byte-level BPE ({vocab_size})")
