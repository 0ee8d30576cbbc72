"""Streaming preparation (`python -m qnext_jax.data prepare`): every input format read back,
N workers' shards = one process's rows through the manifest, resumed workers, memory that does
not grow with the corpus, and bad inputs named."""

import gzip
import json
import tracemalloc

import numpy as np
import pytest
import zstandard

from qnext_jax.data.__main__ import main
from qnext_jax.data.build import DataConfig, document_encoder, documents, packed_rows
from qnext_jax.data.packing import RowPacker
from qnext_jax.data.pipeline import ArrayRecordRows, batch_dataset
from qnext_jax.data.prepare import PrepareJob, prepare_groups
from qnext_jax.data.sources import DataError
from qnext_jax.data.tokenizer import load_tokenizer, train_byte_level_bpe

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def texts(count, seed=0, words=(5, 60)):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(*words))) + f" #{i}" for i in range(count)]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_byte_level_bpe(texts(200), 300).save(path)
    return path


def write_jsonl(path, items, field="text"):
    lines = "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(items))
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(lines.encode()))
    elif path.suffix == ".zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    else:
        path.write_text(lines)


def write_parquet(path, items, field="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: items, "n": list(range(len(items)))}), path, row_group_size=7)


def stored_rows(directory):
    rows = ArrayRecordRows(directory)
    return np.stack([np.concatenate(rows[i]) for i in range(len(rows))])


def packed_by_definition(documents, masks, row_length):
    """Token by token: documents end to end, rows of row_length, each row numbering its pieces
    from 1 (a document cut by a row boundary is piece 1 of the next), padding 0."""
    rows, row = [], []
    for number, (document, mask) in enumerate(zip(documents, masks)):
        for token, flag in zip(document, mask):
            if len(row) == row_length:
                rows.append(row)
                row = []
            piece = 1 if not row else row[-1][1] + (row[-1][2] != number)
            row.append((token, piece, number, flag))
    rows.append(row + [(0, 0, -1, 0)] * (row_length - len(row)))
    table = np.array([[(t, p, f) for t, p, _, f in r] for r in rows])
    return table[..., 0], table[..., 1], table[..., 2]


def test_streaming_packer_against_the_definition():
    """Batches cut anywhere, masks carried alongside: the rows of the packing's definition."""
    rng = np.random.default_rng(1)
    docs = [list(rng.integers(1, 50, rng.integers(1, 40))) for _ in range(60)]
    masks = [list(rng.integers(0, 2, len(d))) for d in docs]
    packer, parts = RowPacker(17, with_mask=True), []
    for start in range(0, len(docs), 7):
        parts.append(packer.add(docs[start:start + 7], masks[start:start + 7]))
    parts.append(packer.finish())
    streamed = [np.concatenate(a) for a in zip(*parts)]
    for got, expected in zip(streamed, packed_by_definition(docs, masks, 17)):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="every document needs a mask of its length"):
        RowPacker(4, with_mask=True).add([[1, 2]], [[1]])


def test_every_format_reads_back(tmp_path):
    """text, JSONL (plain, .gz, .zst), Parquet and a dataset saved by `datasets` give their
    documents back, in order, under the field asked for."""
    import datasets

    items = texts(30)
    (tmp_path / "t").mkdir()
    for i, text in enumerate(items[:3]):
        (tmp_path / "t" / f"{i}.txt").write_text(text)
    for suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        write_jsonl(tmp_path / f"d{suffix}", items, field="body")
    write_parquet(tmp_path / "d.parquet", items, field="body")
    datasets.Dataset.from_dict({"body": items}).save_to_disk(str(tmp_path / "saved"))

    def read(source, pattern, field="body"):
        config = DataConfig(source=source, paths=(str(tmp_path / pattern),), field=field,
                            eval_percent=0)
        return [text for _, text in documents(config, "train")]

    assert read("text", "t/*.txt") == items[:3]
    for suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        assert read("jsonl", f"d{suffix}") == items, suffix
    assert read("parquet", "d.parquet") == items
    assert read("parquet", "saved") == items


def test_bad_inputs_are_named(tmp_path, tokenizer_file):
    write_jsonl(tmp_path / "plain.jsonl", ["x"])
    (tmp_path / "fake.jsonl.gz").write_text('{"text": "not compressed"}\n')
    (tmp_path / "hidden.jsonl").write_bytes(gzip.compress(b'{"text": "x"}\n'))
    (tmp_path / "fake.parquet").write_text("text")
    write_parquet(tmp_path / "d.parquet", ["x"])
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(
        str(tmp_path / "dict"))

    def read(source, name, field="text"):
        config = DataConfig(source=source, paths=(str(tmp_path / name),), field=field,
                            eval_percent=0)
        return list(documents(config, "train"))

    with pytest.raises(DataError, match="fake.jsonl.gz is named as gzip-compressed but is not"):
        read("jsonl", "fake.jsonl.gz")
    with pytest.raises(DataError, match="hidden.jsonl holds gzip-compressed data; name it "
                                        "hidden.jsonl.gz"):
        read("jsonl", "hidden.jsonl")
    with pytest.raises(DataError, match="plain.jsonl:1: expected an object with a field 'body'"):
        read("jsonl", "plain.jsonl", field="body")
    with pytest.raises(DataError, match="fake.parquet is not a Parquet file"):
        read("parquet", "fake.parquet")
    with pytest.raises(DataError, match=r"d.parquet has no column 'body'; its columns are "
                                        r"\['text', 'n'\]"):
        read("parquet", "d.parquet", field="body")
    with pytest.raises(DataError, match="is a saved DatasetDict; name one of its splits"):
        read("parquet", "dict")
    with pytest.raises(DataError, match="d.parquet is parquet data, not text"):
        read("text", "d.parquet")

    out = str(tmp_path / "out")
    common = ["prepare", "--source", "jsonl", "--paths", str(tmp_path / "plain.jsonl"),
              "--seq-len", "8", "--out", out]
    assert main(common + ["--shard", "1/2"]) == 2  # no shared tokenizer
    with pytest.raises(SystemExit):
        main(common + ["--shard", "2/2", "--tokenizer", str(tokenizer_file)])
    assert main(common + ["--tokenizer", str(tokenizer_file), "--eval-percent", "0"]) == 0
    # The same directory again with another row length or split: refused, not mixed; the
    # tokenizer the rows were made with stays.
    tokenizer_json = (tmp_path / "out" / "tokenizer.json").read_text()
    assert main(common + ["--tokenizer", str(tokenizer_file), "--eval-percent", "5"]) == 2
    common[common.index("8")] = "9"
    assert main(common + ["--tokenizer", str(tokenizer_file), "--eval-percent", "0"]) == 2
    assert (tmp_path / "out" / "tokenizer.json").read_text() == tokenizer_json
    # Chat rows are not text rows.
    text_rows = DataConfig(source="prepared", paths=(out,), format="chat")
    with pytest.raises(DataError, match="are text data .* but data.format is 'chat'"):
        packed_rows(text_rows, None, 9, "train")


def corpus(tmp_path, files=9, per_file=40):
    for f in range(files):
        suffix = (".jsonl", ".jsonl.gz", ".jsonl.zst")[f % 3]
        write_jsonl(tmp_path / f"part{f:02d}{suffix}", texts(per_file, seed=f))
    return str(tmp_path / "part*")


def test_sharded_workers_equal_one_process(tmp_path, tokenizer_file, capsys):
    pattern = corpus(tmp_path)
    common = ["prepare", "--source", "jsonl", "--paths", pattern, "--tokenizer",
              str(tokenizer_file), "--seq-len", "31", "--eval-percent", "10",
              "--group-mib", "0.004"]  # a few files a group
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    for shard in ("2/3", "0/3"):  # the manifest waits for the last
        assert main(common + ["--out", str(tmp_path / "three"), "--shard", shard]) == 0
    assert "still missing" in capsys.readouterr().out
    assert not (tmp_path / "three" / "train" / "rows.json").exists()
    assert main(common + ["--out", str(tmp_path / "three"), "--shard", "1/3"]) == 0
    for split in ("train", "eval"):
        one, three = stored_rows(tmp_path / "one" / split), stored_rows(tmp_path / "three" / split)
        np.testing.assert_array_equal(one, three)
    manifest = json.loads((tmp_path / "one" / "train" / "rows.json").read_text())
    assert len(manifest["shards"]) >= 3  # several groups

    # Read through the manifest as hosts read it: two processes holding rows {0, 2} and
    # {1, 3} of each global batch of the three workers' rows see one process's batches.
    whole = ArrayRecordRows(tmp_path / "one" / "train")
    parts = ArrayRecordRows(tmp_path / "three" / "train")
    batches = [b.input_ids for b, _ in zip(batch_dataset(whole, 4, seed=1), range(30))]
    shares = [[b.input_ids for b, _ in zip(batch_dataset(parts, 4, seed=1, held_rows=held),
                                           range(30))] for held in ([0, 2], [1, 3])]
    for batch, first, second in zip(batches, *shares):
        np.testing.assert_array_equal(batch, np.stack([first[0], second[0], first[1], second[1]]))

    # The rows hold the corpus: every training document's tokens, in order, once.
    tokenizer = load_tokenizer(tokenizer_file)
    config = DataConfig(source="jsonl", paths=(pattern,), eval_percent=10)
    expected = tokenizer.encode_documents([t for _, t in documents(config, "train")])
    rows = ArrayRecordRows(tmp_path / "one" / "train")
    stream = np.concatenate([rows[i][0][rows[i][1] > 0] for i in range(len(rows))])
    np.testing.assert_array_equal(stream, np.concatenate(expected))

    # A worker run again skips its finished groups and leaves the rows as they were.
    before = stored_rows(tmp_path / "three" / "train")
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "three"), "--shard", "1/3"]) == 0
    np.testing.assert_array_equal(stored_rows(tmp_path / "three" / "train"), before)
    assert "group" not in capsys.readouterr().out.split("train:")[0]


def test_start_up_packing_equals_prepared_rows(tmp_path, tokenizer_file):
    """Raw files packed at start-up (one group) are the rows `prepare` writes."""
    pattern = corpus(tmp_path, files=3, per_file=30)
    tokenizer = load_tokenizer(tokenizer_file)
    config = DataConfig(source="jsonl", paths=(pattern,), eval_percent=0)
    in_memory = packed_rows(config, tokenizer, 32, "train")
    assert main(["prepare", "--source", "jsonl", "--paths", pattern, "--tokenizer",
                 str(tokenizer_file), "--seq-len", "31", "--eval-percent", "0",
                 "--out", str(tmp_path / "out")]) == 0
    np.testing.assert_array_equal(
        np.concatenate([in_memory.tokens, in_memory.segment_ids], axis=1),
        stored_rows(tmp_path / "out" / "train"))


def test_memory_does_not_grow_with_the_corpus(tmp_path, tokenizer_file):
    """Python-side peak allocation (numpy included) of preparing a corpus and one 10x larger,
    with the same text batch: within 1.5x of each other, while the corpus grows 10x."""
    tokenizer = load_tokenizer(tokenizer_file)
    peaks = []
    for files in (2, 20):
        directory = tmp_path / f"c{files}"
        directory.mkdir()
        for f in range(files):
            write_jsonl(directory / f"part{f:02d}.jsonl", texts(400, seed=f, words=(50, 120)))
        job = PrepareJob(source="jsonl", paths=(str(directory / "*.jsonl"),), field="text",
                         row_length=257, eval_percent=0, out=directory / "out",
                         batch_characters=64 << 10)
        encode = document_encoder(DataConfig(), tokenizer)
        tracemalloc.start()
        prepare_groups(job, tokenizer, encode, report=lambda _: None)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    corpus_bytes = [sum(p.stat().st_size for p in (tmp_path / f"c{n}").glob("*.jsonl"))
                    for n in (2, 20)]
    assert corpus_bytes[1] > 9 * corpus_bytes[0]
    assert peaks[1] < 1.5 * peaks[0], (peaks, corpus_bytes)
