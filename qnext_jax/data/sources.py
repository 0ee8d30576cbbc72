"""Document sources. A document is (name, text); names are stable, so splits and order are too.

- `stdlib_corpus`: the embedded default, text that ships with every Python installation — the
  standard library's modules (its test suite left out) and the `pydoc_data` documentation
  topics. Nothing to download; it differs between Python versions, so runs are reproducible
  per Python version.
- `text_files`: local files or glob patterns, one document per file.
- `jsonl_files`: one document per line, the text under a named field.
"""

from __future__ import annotations

import glob
import json
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
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if skipped.intersection(relative.parts):
            continue
        name = f"stdlib/{relative.as_posix()}"
        if in_split(name, split, eval_percent):
            yield name, path.read_text(encoding="utf-8", errors="replace")
    from pydoc_data import topics

    for topic in sorted(topics.topics):
        name = f"pydoc/{topic}"
        if in_split(name, split, eval_percent):
            yield name, topics.topics[topic]


def expand_paths(patterns: list[str] | str, what: str) -> list[tuple[Path, str]]:
    """Files named by paths or glob patterns, sorted, each with its name for the train/eval
    split: the path relative to the pattern's fixed directory, so that moving a corpus (or
    running from another folder) keeps every document in its split. Each pattern must match."""
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
        files += [(Path(m), os.path.relpath(m, base or ".")) for m in matches if Path(m).is_file()]
    return files


def text_files(patterns, split: str = "train", eval_percent: float = 2.0) -> Iterator[Document]:
    for path, name in expand_paths(patterns, "text file"):
        if in_split(name, split, eval_percent):
            yield str(path), path.read_text(encoding="utf-8", errors="replace")


def jsonl_files(patterns, field: str = "text", split: str = "train",
                eval_percent: float = 2.0) -> Iterator[Document]:
    for path, key in expand_paths(patterns, "JSONL file"):
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                name = f"{path}:{number}"
                if not in_split(f"{key}:{number}", split, eval_percent):
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{name}: not valid JSON ({error.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise DataError(f"{name}: expected an object with a string field {field!r}")
                yield name, record[field]
