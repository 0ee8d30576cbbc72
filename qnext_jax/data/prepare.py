"""Streaming, resumable, scale-out preparation of a corpus into packed ArrayRecord rows.

Documents are read as a stream (data/readers.py), tokenized a batch at a time by the tokenizers
library's batch encoder (its Rust threads use every core), packed as they come (RowPacker) and
written as they are packed: memory holds one batch of text and one partial row per split,
whatever the corpus size.

Scale-out without an engine of our own: the input files are cut into *groups* (consecutive
files in sorted order, about `group_bytes` of input each), a function of the file list alone.
`--shard I/N` prepares the groups g with g % N == I, so N workers (a SLURM array, a Kubernetes
indexed Job, plain processes) split the work, and each group packs its documents on its own
(its last row padded). Each group's rows go to `part-GGGGG.array_record` in each split's
directory, renamed into place when complete, then a `part-GGGGG.json` marker: a worker that is
restarted skips the groups already done. When every group's marker is there, `rows.json` (the
manifest the training reads, listing the parts in group order) is written — by whichever worker
finishes last, or by `python -m qnext_jax.data join OUT`. One process preparing every group
writes the same files, so N workers' rows are one process's rows, in the same order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from qnext_jax.data.packing import RowPacker
from qnext_jax.data.pipeline import METADATA_FILE, ArrayRecordRowWriter
from qnext_jax.data.readers import FORMATS, read_documents
from qnext_jax.data.sources import DataError, SPLITS, expand_paths, in_split, stdlib_documents
from qnext_jax.data.tokenizer import TextTokenizer

# Text handed to one batch encode: large enough for the tokenizer's threads, small in memory.
BATCH_CHARACTERS = 1 << 20


@dataclasses.dataclass(frozen=True)
class Group:
    index: int
    files: tuple[tuple[Path, str], ...]  # (path, key) pairs; empty for the embedded corpus


@dataclasses.dataclass(frozen=True)
class PrepareJob:
    source: str  # stdlib | text | jsonl | parquet
    paths: tuple[str, ...]
    field: str
    row_length: int
    eval_percent: float
    out: Path
    format: str = "text"  # or chat: conversations, packed with the assistant's mask
    group_bytes: int = 256 << 20
    batch_characters: int = BATCH_CHARACTERS  # text a batch encode

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS if self.eval_percent > 0 else ("train",)


def input_groups(job: PrepareJob) -> list[Group]:
    """The job's groups: a function of the sorted file list and the files' sizes only."""
    if job.source == "stdlib":
        return [Group(0, ())]
    if job.source not in FORMATS:
        raise DataError(f"source must be stdlib or one of {FORMATS}, got {job.source!r}")
    files = expand_paths(list(job.paths), f"{job.source} input", directories=job.source == "parquet")
    groups, current, size = [], [], 0
    for path, key in files:
        current.append((path, key))
        size += _size(path)
        if size >= job.group_bytes:
            groups.append(Group(len(groups), tuple(current)))
            current, size = [], 0
    if current:
        groups.append(Group(len(groups), tuple(current)))
    return groups


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def group_documents(job: PrepareJob, group: Group) -> Iterator[tuple[str, str]]:
    if job.source == "stdlib":
        yield from stdlib_documents()
        return
    for path, key in group.files:
        yield from read_documents(path, key, job.source, job.field, chat=job.format == "chat")


def prepare_groups(job: PrepareJob, tokenizer: TextTokenizer, encode,
                   shard: tuple[int, int] = (0, 1), report: Callable[[str], None] = print) -> int:
    """Prepares this shard's groups (skipping finished ones); returns how many it prepared.
    encode: a batch of documents -> the packer's arguments (build.document_encoder)."""
    index, count = shard
    if not 0 <= index < count:
        raise DataError(f"shard {index}/{count}: expected I/N with 0 <= I < N")
    groups = input_groups(job)
    fingerprint = tokenizer.fingerprint()
    settings = job_fingerprint(job, groups)
    done = 0
    for group in groups[index::count]:
        markers = [_marker(job, split, group.index) for split in job.splits]
        existing = [m for m in markers if m.is_file()]
        _check_same_settings(existing, job, len(groups), fingerprint, settings)
        if len(existing) == len(markers):  # done by an earlier run of this shard
            continue
        stats = _prepare_group(job, group, encode)
        for split in job.splits:
            marker = dict(stats[split], row_length=job.row_length, groups=len(groups),
                          tokenizer=fingerprint, tokenizer_source=tokenizer.source,
                          settings=settings, format=job.format)
            _write_atomically(_marker(job, split, group.index), json.dumps(marker))
        report(f"group {group.index + 1}/{len(groups)}: " + ", ".join(
            f"{split} {stats[split]['rows']} rows" for split in job.splits))
        done += 1
    return done


def job_fingerprint(job: PrepareJob, groups: list[Group]) -> str:
    """What decides a group's rows besides the tokenizer: the inputs (keys and sizes), how they
    are read and split, and the grouping."""
    inputs = [(key, _size(path)) for group in groups for path, key in group.files]
    settings = [job.source, job.field, job.format, job.eval_percent, job.group_bytes, inputs]
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]


def _check_same_settings(markers, job: PrepareJob, groups: int, fingerprint: str,
                         settings: str) -> None:
    for path in markers:
        part = json.loads(path.read_text())
        expected = {"row_length": job.row_length, "groups": groups, "tokenizer": fingerprint,
                    "settings": settings}
        for field, value in expected.items():
            if part[field] != value:
                raise DataError(f"{path} was prepared with {field} {part[field]!r}, this run has "
                                f"{value!r}: prepare into a new --out directory")


def _prepare_group(job: PrepareJob, group: Group, encode) -> dict:
    out = {split: _Output(job, split, group.index) for split in job.splits}
    batch = {split: [] for split in job.splits}
    characters = 0
    for key, document in group_documents(job, group):
        split = "eval" if in_split(key, "eval", job.eval_percent) else "train"
        batch[split].append(document)
        characters += len(document) if isinstance(document, str) else len(str(document))
        if characters >= job.batch_characters:
            for split in job.splits:
                out[split].add(batch[split], encode)
                batch[split] = []
            characters = 0
    for split in job.splits:
        out[split].add(batch[split], encode)
    return {split: out[split].close() for split in job.splits}


class _Output:
    """One split of one group: its packer and its ArrayRecord file, opened on the first row."""

    def __init__(self, job: PrepareJob, split: str, group: int):
        self.path = job.out / split / f"part-{group:05d}.array_record"
        self.packer = RowPacker(job.row_length, with_mask=job.format == "chat")
        self.writer = None
        self.documents = self.rows = 0

    def add(self, documents, encode) -> None:
        self.documents += len(documents)
        if documents:
            self._write(*self.packer.add(*encode(documents)))

    def _write(self, tokens, *fields) -> None:
        if len(tokens) and self.writer is None:
            self.writer = ArrayRecordRowWriter(self.path)
        if len(tokens):
            self.writer.write(tokens, *fields)
            self.rows += len(tokens)

    def close(self) -> dict:
        self._write(*self.packer.finish())
        if self.writer is not None:
            self.writer.close()
        return {"rows": self.rows, "documents": self.documents, "tokens": self.packer.tokens_in}


def _marker(job: PrepareJob, split: str, group: int) -> Path:
    return job.out / split / f"part-{group:05d}.json"


def _write_atomically(path: Path, text: str) -> None:
    """Under a name of its own first (workers finishing together may write the same file)."""
    descriptor, partial = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    os.replace(partial, path)


def join(out: Path, splits=SPLITS) -> dict[str, int] | None:
    """Writes each split's manifest once every group's marker is there; returns the rows of
    each split, or None while groups are missing. Markers that disagree (another tokenizer,
    another row length, another input list) are an error naming them."""
    out = Path(out)
    complete = {}
    for split in splits:
        directory = out / split
        markers = sorted(directory.glob("part-*.json")) if directory.is_dir() else []
        if not markers:
            if split == "train":
                raise DataError(f"{directory} holds no prepared groups")
            continue
        parts = [(m, json.loads(m.read_text())) for m in markers]
        first = parts[0][1]
        for path, part in parts:
            for field in ("row_length", "groups", "tokenizer", "settings"):
                if part[field] != first[field]:
                    raise DataError(f"{path} was prepared with {field} {part[field]!r}, "
                                    f"{markers[0]} with {first[field]!r}: prepare every shard "
                                    "of a corpus with the same settings")
        if len(parts) < first["groups"]:
            return None
        if split == "train" and not any(part["tokens"] for _, part in parts):
            raise DataError(f"{out}: the corpus has no tokens in its training split")
        complete[split] = parts
    totals = {}
    for split, parts in complete.items():
        first = parts[0][1]
        manifest = {
            "row_length": first["row_length"], "rows": sum(part["rows"] for _, part in parts),
            "shards": [m.with_suffix(".array_record").name for m, part in parts if part["rows"]],
            "tokenizer": first["tokenizer_source"], "tokenizer_fingerprint": first["tokenizer"],
            "format": first["format"],
            "documents": sum(part["documents"] for _, part in parts),
            "tokens": sum(part["tokens"] for _, part in parts),
        }
        _write_atomically(out / split / METADATA_FILE, json.dumps(manifest, indent=1))
        totals[split] = manifest["rows"]
    return totals
