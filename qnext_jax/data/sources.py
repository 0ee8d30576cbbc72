"""Document sources. A document is (name, text); names are stable, so splits and order are too.

- `stdlib_corpus`: the embedded default, text that ships with every Python installation — the
  standard library's modules (its test suite left out) and the `pydoc_data` documentation
  topics. Nothing to download; it differs between Python versions, so runs are reproducible
  per Python version.
- `expand_paths`: the files (text, JSONL, Parquet: data/readers.py reads them) named by paths or
  glob patterns.
"""

from __future__ import annotations

import glob
import os
import re
import sysconfig
import zlib
from pathlib import Path
from typing import Iterator

from qnext_jax.config import ConfigError

Document = tuple[str, str]
SPLITS = ("train", "eval")


class DataError(ConfigError):
    """Data that cannot be read as asked: a missing path, an empty corpus, a bad record."""


def in_split(name: str, split: str, eval_percent: float) -> bool:
    """A document's split from a hash of its name: stable across runs, machines and orders."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    bucket = zlib.crc32(name.encode()) % 10_000
    return (bucket < eval_percent * 100) == (split == "eval")


def stdlib_corpus(split: str = "train", eval_percent: float = 2.0) -> Iterator[Document]:
    for name, text in stdlib_documents():
        if in_split(name, split, eval_percent):
            yield name, text


def stdlib_documents() -> Iterator[Document]:
    """Every document of the embedded corpus, both splits, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if skipped.intersection(relative.parts):
            continue
        yield f"stdlib/{relative.as_posix()}", path.read_text(encoding="utf-8", errors="replace")
    from pydoc_data import topics

    for topic in sorted(topics.topics):
        yield f"pydoc/{topic}", topics.topics[topic]


def expand_paths(patterns: list[str] | str, what: str, *,
                 directories: bool = False) -> list[tuple[Path, str]]:
    """Files (and, with `directories`, directories) named by paths or glob patterns, sorted,
    each with its name for the train/eval split: the path relative to the pattern's fixed
    directory, so that moving a corpus (or running from another folder) keeps every document in
    its split. Each pattern must match."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise DataError(f"no {what} given")
    files = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise DataError(f"{what} {pattern!r} matches no file")
        fixed = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
        base = os.path.dirname(fixed)
        files += [(Path(m), os.path.relpath(m, base or ".")) for m in matches
                  if Path(m).is_file() or (directories and Path(m).is_dir())]
    return files
