"""From a data config to a tokenizer and the packed train / eval rows a run reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from qnext_jax.config import check_known_keys
from qnext_jax.data.packing import RowPacker
from qnext_jax.data.pipeline import ArrayRecordRows, InMemoryRows, MixedRows
from qnext_jax.data.chat_template import ChatTemplate
from qnext_jax.data.readers import read_documents
from qnext_jax.data.sft import ConversationEncoder
from qnext_jax.data.sources import DataError, expand_paths, in_split, stdlib_corpus
from qnext_jax.data.tokenizer import TextTokenizer, load_tokenizer, train_byte_level_bpe

SOURCES = ("stdlib", "text", "jsonl", "parquet", "prepared")
ENCODE_BATCH_DOCUMENTS = 256  # documents a batch encode at start-up (bounded memory)
TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # stdlib (embedded) | text | jsonl (.jsonl, .gz, .zst) | parquet (files, or a dataset saved
    # by save_to_disk) | prepared (ArrayRecord rows)
    source: str = "stdlib"
    # Files, directories or globs; for `prepared` one directory, or several with `weights` (a
    # mixture: rows drawn from each in those proportions).
    paths: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    # text: documents to continue; chat: conversations (JSONL or Parquet, a list of messages
    # with roles) rendered by the chat template, the loss on the assistant's tokens alone.
    format: str = "text"
    field: str | None = None  # the JSONL field or Parquet column: "text", or "messages" for chat
    chat_template: str | None = None  # a model directory or Jinja file; default: the tokenizer's
    tokenizer: str | None = None  # a tokenizer.json; None trains the default byte-level BPE
    eval_percent: float = 2.0  # documents held out for evaluation, chosen by name hash
    seed: int = 0  # shuffling

    def __post_init__(self):
        object.__setattr__(self, "paths", (self.paths,) if isinstance(self.paths, str) else tuple(self.paths))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if self.source not in SOURCES:
            raise DataError(f"data.source must be one of {SOURCES}, got {self.source!r}")
        if self.source != "stdlib" and not self.paths:
            raise DataError(f"data.source {self.source!r} needs data.paths")
        if self.weights and (self.source != "prepared" or len(self.weights) != len(self.paths)):
            raise DataError(f"data.weights weighs prepared corpora, one weight per directory in "
                            f"data.paths; got {len(self.weights)} weights for source "
                            f"{self.source!r} with {len(self.paths)} paths")
        if self.source == "prepared" and len(self.paths) > 1 and not self.weights:
            raise DataError(f"data.paths names {len(self.paths)} prepared directories: a mixture "
                            "needs data.weights, one weight per directory")
        if self.format not in ("text", "chat"):
            raise DataError(f"data.format must be text or chat, got {self.format!r}")
        if self.format == "chat" and self.source not in ("jsonl", "parquet", "prepared"):
            raise DataError(f"data.format chat reads conversations from jsonl or parquet files "
                            f"(or prepared rows), not data.source {self.source!r}")
        if self.format == "chat" and self.source != "prepared" and self.tokenizer is None:
            raise DataError("data.format chat needs data.tokenizer (the model's tokenizer.json or "
                            "its directory, whose chat template renders the conversations)")
        if not 0 <= self.eval_percent < 100:
            raise DataError(f"data.eval_percent must be in [0, 100), got {self.eval_percent}")

    @property
    def record_field(self) -> str:
        return self.field or ("messages" if self.format == "chat" else "text")

    def chat_encoder(self, tokenizer: TextTokenizer) -> ConversationEncoder:
        """Renders and masks conversations with the configured template (by default the one
        beside the tokenizer)."""
        path = self.chat_template
        if path is None:
            path = Path(self.tokenizer).expanduser()
            path = path if path.is_dir() else path.parent
        return ConversationEncoder(tokenizer, ChatTemplate.from_path(path))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        check_known_keys(values, cls, "data")
        return cls(**values)

    def check_paths(self, evaluate: bool = True) -> None:
        """Fails before anything is compiled if a path is missing (the eval split's only
        when the run evaluates)."""
        if self.source == "prepared":
            for directory in map(Path, self.paths):
                if evaluate and (directory / "train").is_dir() and not (directory / "eval").is_dir():
                    raise DataError(
                        f"prepared data in {directory} has no eval split (prepared with "
                        "--eval-percent 0); turn evaluation off with train.eval_every=0"
                    )
                for split in ("train", "eval") if evaluate else ("train",):
                    ArrayRecordRows(directory / split)
            _check_same_tokenizer(self.paths)
        elif self.source in ("text", "jsonl", "parquet"):
            expand_paths(list(self.paths), f"{self.source} input",
                         directories=self.source == "parquet")
        if self.tokenizer is not None and not Path(self.tokenizer).exists():
            raise DataError(f"data.tokenizer {self.tokenizer} does not exist")


def _check_same_tokenizer(directories) -> None:
    """The corpora of a mixture were tokenized alike (their tokenizer.json are one file)."""
    contents = {d: (Path(d) / TOKENIZER_FILE).read_bytes()
                for d in directories if (Path(d) / TOKENIZER_FILE).is_file()}
    first = next(iter(contents), None)
    for directory, content in contents.items():
        if content != contents[first]:
            raise DataError(f"prepared corpora {first} and {directory} were tokenized with "
                            f"different tokenizers ({TOKENIZER_FILE}); a mixture needs one")


def documents(config: DataConfig, split: str):
    if config.source == "stdlib":
        return stdlib_corpus(split, config.eval_percent)
    if config.source == "prepared":
        raise DataError("prepared data has no documents, only rows")
    return _file_documents(config, split)


def _file_documents(config: DataConfig, split: str):
    files = expand_paths(list(config.paths), f"{config.source} input",
                         directories=config.source == "parquet")
    for path, key in files:
        for name, text in read_documents(path, key, config.source, config.record_field,
                                         chat=config.format == "chat"):
            if in_split(name, split, config.eval_percent):
                yield name, text


def make_tokenizer(config: DataConfig, vocab_size: int | None, cached: Path | None = None, *,
                   vocab_setting: str = "model.vocab_size") -> TextTokenizer:
    """The configured tokenizer; else the prepared data's; else `cached`, if it exists (a
    resumed run keeps its tokenizer); else a byte-level BPE of `vocab_size` trained on the
    training split (deterministic: every process of a run trains the same one).

    vocab_size also bounds a given tokenizer (None: no bound); `vocab_setting` is the name of
    the setting it came from, for the error."""
    if config.tokenizer is not None:
        tokenizer = load_tokenizer(config.tokenizer)
    elif config.source == "prepared":
        tokenizer = load_tokenizer(Path(config.paths[0]) / TOKENIZER_FILE)
    elif cached is not None and Path(cached).is_file():
        tokenizer = load_tokenizer(cached)
    else:
        if vocab_size is None:
            raise DataError(f"{vocab_setting} is needed to train the default byte-level BPE")
        tokenizer = train_byte_level_bpe((text for _, text in documents(config, "train")), vocab_size)
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but "
            f"{vocab_setting} is {vocab_size}; use a larger {vocab_setting}"
        )
    return tokenizer


def packed_rows(config: DataConfig, tokenizer: TextTokenizer, row_length: int, split: str):
    """Random-access rows of `row_length` tokens for one split."""
    if config.source == "prepared":
        corpora = []
        for directory in config.paths:
            rows = ArrayRecordRows(Path(directory) / split)
            if rows.row_length != row_length:
                raise DataError(f"prepared rows in {directory} are {rows.row_length} tokens long; "
                                f"this run needs {row_length} (sequence length + 1)")
            if rows.format != config.format:
                raise DataError(f"prepared rows in {directory} are {rows.format} data "
                                f"(prepare --format {rows.format}) but data.format is "
                                f"{config.format!r}")
            corpora.append(rows)
        return corpora[0] if len(corpora) == 1 else MixedRows(corpora, config.weights)
    # Packed as the documents stream in: the corpus is held once, as int32 rows.
    chat = config.format == "chat"
    encode = document_encoder(config, tokenizer)
    packer, parts, batch = RowPacker(row_length, with_mask=chat), [], []
    for _, document in documents(config, split):
        batch.append(document)
        if len(batch) == ENCODE_BATCH_DOCUMENTS:
            parts.append(packer.add(*encode(batch)))
            batch = []
    parts += [packer.add(*encode(batch)), packer.finish()]
    if packer.tokens_in == 0:
        raise DataError(f"the {split} split of data source {config.source!r} has no documents")
    return InMemoryRows(*(np.concatenate(arrays) for arrays in zip(*parts)))


def document_encoder(config: DataConfig, tokenizer: TextTokenizer):
    """documents -> the packer's arguments: (ids,) for text, (ids, assistant masks) for chat."""
    if config.format != "chat":
        return lambda texts: (tokenizer.encode_documents(texts),)
    encoder = config.chat_encoder(tokenizer)
    return lambda conversations: tuple(zip(*encoder.encode(conversations))) or ([], [])
