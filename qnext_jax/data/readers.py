"""Documents from files, one format each, read as streams (memory bounded by one record batch).

- text: one document per file;
- JSONL: one document per line, the text under a named field; plain, `.gz` or `.zst`;
- Parquet (the format Hugging Face datasets are stored in): one document per row, the text in a
  named column, read a record batch at a time (pyarrow);
- a Hugging Face dataset saved with `save_to_disk` (a directory of Arrow stream files listed in
  its `state.json`): as Parquet.

Every reader yields (key, text), the key stable across machines and orders (the file's name
relative to its pattern, plus the line or row number) so the train/eval split can hash it. A
file that is not what its name says (gzip bytes named `.jsonl`, a `.parquet` without Parquet's
magic), a missing field and a record that is not text are errors naming the file and record.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Iterator

from qnext_jax.data.sources import DataError

FORMATS = ("text", "jsonl", "parquet")
_MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd", "parquet": b"PAR1"}
_COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_ROWS_PER_BATCH = 1024


def read_documents(path: Path, key: str, format: str, field: str,
                   chat: bool = False) -> Iterator[tuple[str, object]]:
    """(key, document) of every document in one file (a directory for a saved HF dataset): its
    text, or with `chat` its conversation (a list of messages with roles)."""
    check = _conversation if chat else _text
    if format == "text" and not chat:
        yield key, _check_text(path).read_text(encoding="utf-8", errors="replace")
    elif format == "jsonl":
        yield from _jsonl(path, key, field, check)
    elif format == "parquet":
        yield from _arrow_rows(path, key, field, check)
    else:
        kinds = ("jsonl", "parquet") if chat else FORMATS
        raise DataError(f"format must be one of {kinds}, got {format!r}")


def _leading_bytes(path: Path, count: int = 4) -> bytes:
    with path.open("rb") as file:
        return file.read(count)


def _compression(path: Path) -> str | None:
    """The compression the name says, checked against the bytes (both ways)."""
    named = _COMPRESSION.get(path.suffix.lower())
    head = _leading_bytes(path)
    found = next((kind for kind in ("gzip", "zstd") if head.startswith(_MAGIC[kind])), None)
    if named is not None and found != named:
        raise DataError(f"{path} is named as {named}-compressed but is not {named} data")
    if named is None and found is not None:
        raise DataError(f"{path} holds {found}-compressed data; name it {path.name}"
                        f"{'.gz' if found == 'gzip' else '.zst'} to have it decompressed")
    return named


def _check_text(path: Path) -> Path:
    head = _leading_bytes(path)
    for kind, magic in _MAGIC.items():
        if head.startswith(magic):
            raise DataError(f"{path} is {kind} data, not text: use data.source "
                            f"{'parquet' if kind == 'parquet' else 'jsonl'} for it")
    return path


def _open_lines(path: Path):
    compression = _compression(path)
    if compression == "gzip":
        return gzip.open(path, "rt", encoding="utf-8")
    if compression == "zstd":
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True)
        return io.TextIOWrapper(stream, encoding="utf-8")
    return path.open(encoding="utf-8")


def _jsonl(path: Path, key: str, field: str, check):
    with _open_lines(path) as lines:
        try:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
                if not isinstance(record, dict) or field not in record:
                    raise DataError(f"{path}:{number}: expected an object with a field {field!r}"
                                    + (f"; it has {sorted(record)}" if isinstance(record, dict)
                                       else ""))
                yield f"{key}:{number}", check(record[field], f"{path}:{number}", field)
        except _corrupt_data_errors() as error:  # truncated or corrupt compressed data
            raise DataError(f"{path}: cannot be read as JSONL ({error})") from None


def _corrupt_data_errors() -> tuple[type[Exception], ...]:
    import zstandard

    return OSError, EOFError, UnicodeDecodeError, zstandard.ZstdError


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} holds {type(value).__name__}, not text")
    return value


def _conversation(value, where: str, field: str) -> list[dict]:
    if not (isinstance(value, list) and value
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value)):
        raise DataError(f"{where}: field {field!r} is not a conversation (a list of messages, "
                        f"each with a \"role\" and its \"content\"); got {value!r:.120}")
    return value


def _arrow_rows(path: Path, key: str, field: str, check):
    """Rows of a Parquet file or of a saved Hugging Face dataset, a record batch at a time."""
    row = 0
    for batch in _record_batches(path, field):
        for value in batch.column(0).to_pylist():
            row += 1
            yield f"{key}:{row}", check(value, f"{path} row {row}", field)


def _record_batches(path: Path, field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_dir():
        for file in _saved_dataset_files(path):
            try:
                with pa.memory_map(str(file)) as source:
                    reader = pa.ipc.open_stream(source)
                    _check_column(reader.schema, field, file)
                    for batch in reader:
                        yield batch.select([field])
            except (pa.ArrowException, OSError) as error:
                raise DataError(f"{file}: cannot be read as an Arrow stream ({error})") from None
        return
    if _leading_bytes(path) != _MAGIC["parquet"]:
        raise DataError(f"{path} is not a Parquet file (no Parquet magic bytes)")
    try:
        parquet = pq.ParquetFile(str(path))
        _check_column(parquet.schema_arrow, field, path)
        yield from parquet.iter_batches(batch_size=_ROWS_PER_BATCH, columns=[field])
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: cannot be read as Parquet ({error})") from None


def _check_column(schema, field: str, path: Path) -> None:
    if field not in schema.names:
        raise DataError(f"{path} has no column {field!r}; its columns are {schema.names}")


def _saved_dataset_files(directory: Path) -> list[Path]:
    """The Arrow files of a dataset written by `datasets.Dataset.save_to_disk`, in order."""
    if (directory / "dataset_dict.json").is_file():
        splits = json.loads((directory / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{directory} is a saved DatasetDict; name one of its splits "
                        f"({', '.join(str(directory / s) for s in splits)})")
    state = directory / "state.json"
    if not state.is_file():
        raise DataError(f"{directory} is not a saved Hugging Face dataset (no state.json)")
    try:
        files = [directory / entry["filename"]
                 for entry in json.loads(state.read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DataError(f"{state} does not list the dataset's Arrow files (_data_files)") from None
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"saved dataset {directory}: data files missing: {missing}")
    return files
