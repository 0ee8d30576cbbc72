"""Data: the embedded corpus and its split, file sources and their errors, tokenizers, packing,
and the grain pipeline (order by seed, per-process shards, exact resume, ArrayRecord rows)."""

import json

import numpy as np
import pytest

from qnext_jax.data.packing import RowPacker
from qnext_jax.data.pipeline import ArrayRecordRowWriter, ArrayRecordRows, InMemoryRows, batch_dataset
from qnext_jax.data.build import DataConfig, documents
from qnext_jax.data.sources import DataError, stdlib_corpus
from qnext_jax.data.tokenizer import END_OF_TEXT, load_tokenizer, train_byte_level_bpe


def text_files(pattern, split="train", eval_percent=2.0):
    return documents(DataConfig(source="text", paths=(pattern,), eval_percent=eval_percent), split)


def jsonl_files(pattern, split="train", eval_percent=2.0):
    return documents(DataConfig(source="jsonl", paths=(pattern,), eval_percent=eval_percent), split)


def test_stdlib_corpus_is_split_by_name_deterministically():
    train = [name for name, _ in stdlib_corpus("train")]
    held_out = [name for name, _ in stdlib_corpus("eval")]
    assert len(train) > 500 and 5 <= len(held_out) < 0.05 * len(train)
    assert not set(train) & set(held_out)
    assert any(n.startswith("pydoc/") for n in train) and any(n.startswith("stdlib/") for n in train)
    assert not any("/test/" in n or "site-packages" in n for n in train)
    assert held_out == [name for name, _ in stdlib_corpus("eval")]


def test_file_sources_and_their_errors(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    docs = list(text_files(str(tmp_path / "*.txt"), eval_percent=0))
    assert docs == [("a.txt", "alpha"), ("b.txt", "beta")]
    with pytest.raises(DataError, match="text input .*missing.txt' matches no file"):
        list(text_files(str(tmp_path / "missing.txt")))

    lines = [json.dumps({"text": "one"}), "", json.dumps({"text": "two", "id": 2})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    assert [t for _, t in jsonl_files(str(tmp_path / "d.jsonl"), eval_percent=0)] == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with a field 'text'; it has \['body'\]"):
        list(jsonl_files(str(tmp_path / "bad.jsonl"), eval_percent=0))
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(DataError, match=r"broken.jsonl:1: not valid JSON"):
        list(jsonl_files(str(tmp_path / "broken.jsonl"), eval_percent=0))


def test_split_of_file_sources_does_not_depend_on_where_the_corpus_lies(tmp_path):
    for root in ("here", "elsewhere/deeper"):
        for i in range(200):
            path = tmp_path / root / "corpus" / f"doc{i:03d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(str(i))
            (path.parent / f"doc{i:03d}.jsonl").write_text(json.dumps({"text": str(i)}) + "\n")
    held_out = {root: ([t for _, t in text_files(str(tmp_path / root / "corpus" / "*.txt"), "eval", 10)],
                       [t for _, t in jsonl_files(str(tmp_path / root / "corpus/*.jsonl"), split="eval",
                                                  eval_percent=10)])
                for root in ("here", "elsewhere/deeper")}
    assert held_out["here"] == held_out["elsewhere/deeper"]
    assert 5 <= len(held_out["here"][0]) <= 40 and 5 <= len(held_out["here"][1]) <= 40


def test_default_tokenizer_round_trips_and_saves_as_tokenizer_json(tmp_path):
    texts = ["def add(a, b):\n    return a + b\n"] * 20 + ["héllo wörld ✓"]
    tokenizer = train_byte_level_bpe(texts, vocab_size=300)
    assert 258 < tokenizer.vocab_size <= 300  # at most the size asked; fewer merges exist here
    ids = tokenizer.encode_documents(texts[-2:])
    assert all(doc[-1] == tokenizer.end_of_text_id for doc in ids)
    assert tokenizer.decode(ids[1][:-1]) == "héllo wörld ✓"  # bytes never fall out of the vocab
    assert len(ids[0]) < len(texts[0].encode())  # merges learned
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode_documents(texts[:1]) == tokenizer.encode_documents(texts[:1])
    assert train_byte_level_bpe(texts, 300).encode_documents(texts) == tokenizer.encode_documents(texts)
    with pytest.raises(DataError, match="tokenizer file .*nowhere.json does not exist"):
        load_tokenizer(tmp_path / "nowhere.json")
    assert END_OF_TEXT in loaded.tokenizer.get_vocab()


def write_array_record_rows(directory, tokens, segment_ids, *, rows_per_shard=65_536):
    """Rows held in memory -> ArrayRecord shards and the manifest `prepare` writes."""
    shards = []
    for start in range(0, len(tokens), rows_per_shard):
        shards.append(f"rows-{len(shards):05d}.array_record")
        writer = ArrayRecordRowWriter(directory / shards[-1])
        writer.write(tokens[start:start + rows_per_shard], segment_ids[start:start + rows_per_shard])
        writer.close()
    (directory / "rows.json").write_text(json.dumps(
        {"row_length": int(tokens.shape[1]), "rows": len(tokens), "shards": shards}))


def test_packing_cuts_documents_into_rows_with_segments():
    packer = RowPacker(4)
    full = packer.add([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]])
    last = packer.finish()
    np.testing.assert_array_equal(np.concatenate([full[0], last[0]]),
                                  [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 0]])
    np.testing.assert_array_equal(np.concatenate([full[1], last[1]]),
                                  [[1, 1, 1, 2], [1, 2, 2, 2], [1, 1, 1, 0]])
    assert packer.tokens_in == 11 and len(RowPacker(4).finish()[0]) == 0


@pytest.fixture
def rows():
    tokens = np.arange(48 * 9, dtype=np.int32).reshape(48, 9)  # row r starts with 9r
    return InMemoryRows(tokens, np.ones_like(tokens))


def first_tokens(batch):
    return [int(t) // 9 for t in batch.input_ids[:, 0]]


def test_pipeline_order_shards_and_epochs(rows):
    order = [first_tokens(b) for b, _ in zip(batch_dataset(rows, 4, seed=1), range(12))]
    again = [first_tokens(b) for b, _ in zip(batch_dataset(rows, 4, seed=1), range(12))]
    other = [first_tokens(b) for b, _ in zip(batch_dataset(rows, 4, seed=2), range(12))]
    assert order == again and order != other
    assert sorted(sum(order, [])) == list(range(48))  # one epoch: every row once
    assert sum(order, [])[:48] != list(range(48))  # shuffled
    second_epoch = [first_tokens(b) for b, _ in zip(batch_dataset(rows, 4, seed=1), range(24))][12:]
    assert sorted(sum(second_epoch, [])) == list(range(48)) and second_epoch != order

    # Processes holding rows {0, 2} and {1, 3} of each global batch read exactly those rows:
    # together, the same batches; two processes holding the same rows read the same.
    shares = [[first_tokens(b) for b, _ in zip(batch_dataset(rows, 4, seed=1, held_rows=held),
                                               range(12))] for held in ([0, 2], [1, 3])]
    assert [[a[0], b[0], a[1], b[1]] for a, b in zip(*shares)] == order
    again = [first_tokens(b) for b, _ in zip(batch_dataset(rows, 4, seed=1, held_rows=[0, 2]),
                                             range(12))]
    assert again == shares[0]


def test_pipeline_resumes_exactly_from_its_state(rows):
    iterator = iter(batch_dataset(rows, 4, seed=5))
    for _ in range(7):  # into the second epoch
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(5)]
    resumed = iter(batch_dataset(rows, 4, seed=5))
    resumed.set_state(json.loads(json.dumps(state)))  # the state survives JSON
    for want in expected:
        got = next(resumed)
        for field in want._fields:
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


def test_array_record_rows_equal_the_rows_written(rows, tmp_path):
    write_array_record_rows(tmp_path / "prepared", rows.tokens, rows.segment_ids, rows_per_shard=20)
    stored = ArrayRecordRows(tmp_path / "prepared")
    assert len(stored) == 48 and len(stored.metadata["shards"]) == 3
    for index in (0, 19, 20, 47):
        np.testing.assert_array_equal(stored[index][0], rows.tokens[index])
        np.testing.assert_array_equal(stored[index][1], rows.segment_ids[index])
    with pytest.raises(DataError, match="holds no prepared rows"):
        ArrayRecordRows(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "rows.json").write_text('{"row_length": 9, "rows": 0, "shards": []}')
    with pytest.raises(DataError, match="are empty"):
        ArrayRecordRows(tmp_path / "empty")
    with pytest.raises(DataError, match="fewer than one global batch"):
        batch_dataset(stored, 60, seed=0, held_rows=[0, 1])


def test_prepare_command_writes_rows_a_prepared_run_reads(tmp_path):
    from qnext_jax.data.__main__ import main
    from qnext_jax.data.build import DataConfig, make_tokenizer, packed_rows

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"document {i}: " + "word " * (i % 17)})
                                for i in range(300)))
    out = tmp_path / "prepared"
    assert main(["prepare", "--source", "jsonl", "--paths", str(corpus), "--vocab-size", "300",
                 "--seq-len", "15", "--eval-percent", "10", "--out", str(out)]) == 0
    prepared = DataConfig(source="prepared", paths=(str(out),))
    prepared.check_paths()
    tokenizer = make_tokenizer(prepared, 300)
    direct = DataConfig(source="jsonl", paths=(str(corpus),), tokenizer=str(out / "tokenizer.json"),
                        eval_percent=10)
    for split in ("train", "eval"):
        stored, fresh = packed_rows(prepared, tokenizer, 16, split), packed_rows(direct, tokenizer, 16, split)
        assert len(stored) == len(fresh) > 0
        np.testing.assert_array_equal(stored[len(fresh) - 1][0], fresh[len(fresh) - 1][0])
    with pytest.raises(DataError, match="prepared rows in .* are 16 tokens long; this run needs 33"):
        packed_rows(prepared, tokenizer, 33, "train")
    with pytest.raises(DataError, match="tokenizer .* has 300 tokens but model.vocab_size is 256"):
        make_tokenizer(prepared, 256)
    assert main(["prepare", "--source", "text", "--paths", str(tmp_path / "none*.txt"),
                 "--seq-len", "15", "--out", str(tmp_path / "x")]) == 2


def test_prepare_with_a_large_tokenizer_checks_only_a_given_vocab_size(tmp_path, capsys):
    """A tokenizer.json of 9,000 tokens (more than the default BPE's 8,192) prepares as it is;
    a --vocab-size given beside it is the bound, and the error names that option."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from qnext_jax.data.__main__ import main

    vocab = {f"w{i}": i for i in range(9000)} | {"<|endoftext|>": 9000, "<unk>": 9001}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"w{i}" for i in range(0, 9000, 7)))
    common = ["prepare", "--source", "text", "--paths", str(corpus), "--tokenizer",
              str(tmp_path / "tokenizer.json"), "--seq-len", "15", "--eval-percent", "0"]
    assert main(common + ["--out", str(tmp_path / "out")]) == 0
    assert main(common + ["--vocab-size", "5000", "--out", str(tmp_path / "bounded")]) == 2
    assert "has 9002 tokens but --vocab-size is 5000" in capsys.readouterr().err


def test_data_config_errors(tmp_path):
    from qnext_jax.data.build import DataConfig

    with pytest.raises(DataError, match="data.source must be one of"):
        DataConfig(source="web")
    with pytest.raises(DataError, match="data.source 'jsonl' needs data.paths"):
        DataConfig(source="jsonl")
    from qnext_jax.config import ConfigError

    with pytest.raises(ConfigError, match=r"unknown key data.path \(did you mean 'paths'\?\)"):
        DataConfig.from_dict({"path": "x"})
    with pytest.raises(DataError, match="holds no prepared rows"):
        DataConfig(source="prepared", paths=(str(tmp_path),)).check_paths()


def prepared_corpus(directory, first_token, count, length=9):
    """A prepared corpus whose row r starts with token first_token + r."""
    tokens = np.add.outer(first_token + np.arange(count), np.zeros(length, np.int64)).astype(np.int32)
    for split in ("train", "eval"):
        write_array_record_rows(directory / split, tokens, np.ones_like(tokens))
    (directory / "tokenizer.json").write_text("{}")
    return str(directory)


def test_mixture_proportions_and_exact_resume(tmp_path):
    """Two prepared corpora mixed 3:1: each batch's rows come from both in proportion, every
    component reshuffled by its own seed; the mixture resumes exactly from its state."""
    from qnext_jax.data.build import DataConfig, packed_rows

    paths = (prepared_corpus(tmp_path / "a", 0, 40), prepared_corpus(tmp_path / "b", 1000, 25))
    config = DataConfig(source="prepared", paths=paths, weights=(3, 1))
    config.check_paths()
    rows = packed_rows(config, None, 9, "train")
    drawn = [int(t) for batch, _ in zip(batch_dataset(rows, 8, seed=3), range(50))
             for t in batch.input_ids[:, 0]]
    from_b = sum(t >= 1000 for t in drawn)
    assert abs(from_b / len(drawn) - 0.25) < 3 * np.sqrt(0.25 * 0.75 / len(drawn))
    # Both corpora are read through whole epochs, each in its own shuffled order.
    a_rows = [t for t in drawn if t < 1000]
    assert sorted(a_rows[:40]) == list(range(40)) and a_rows[:40] != list(range(40))
    assert sorted([t - 1000 for t in drawn if t >= 1000][:25]) == list(range(25))

    iterator = iter(batch_dataset(rows, 8, seed=3))
    for _ in range(9):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = [next(iterator).input_ids for _ in range(4)]
    resumed = iter(batch_dataset(packed_rows(config, None, 9, "train"), 8, seed=3))
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed).input_ids, want)


def test_mixture_errors(tmp_path):
    from qnext_jax.data.build import DataConfig

    a, b = prepared_corpus(tmp_path / "a", 0, 4), prepared_corpus(tmp_path / "b", 100, 4)
    with pytest.raises(DataError, match="names 2 prepared directories: a mixture needs data.weights"):
        DataConfig(source="prepared", paths=(a, b))
    with pytest.raises(DataError, match="one weight per directory in data.paths; got 3 weights"):
        DataConfig(source="prepared", paths=(a, b), weights=(1, 2, 3))
    (tmp_path / "b" / "tokenizer.json").write_text('{"other": 1}')
    with pytest.raises(DataError, match="were tokenized with different tokenizers"):
        DataConfig(source="prepared", paths=(a, b), weights=(1, 1)).check_paths()
    from qnext_jax.data.pipeline import MixedRows

    with pytest.raises(DataError, match="mixture weights must be positive"):
        MixedRows([[1], [2]], [1, 0])
