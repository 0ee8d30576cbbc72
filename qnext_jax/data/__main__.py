"""`python -m qnext_jax.data prepare ...`: tokenize and pack a corpus once into ArrayRecord rows
(train/ and eval/), with its tokenizer.json beside them, for `data.source=prepared`; streaming,
resumable, and split over workers with `--shard I/N` (data/prepare.py). `join OUT` writes the
manifests of a directory the workers filled (the last worker to finish also does)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qnext_jax.data.build import TOKENIZER_FILE, DataConfig, document_encoder, make_tokenizer
from qnext_jax.data.prepare import PrepareJob, join, prepare_groups
from qnext_jax.data.sources import DataError

DEFAULT_BPE_VOCAB = 8192


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (this worker's index and the number of "
                                         f"workers, e.g. 0/8), got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard {text}: expected 0 <= I < N")
    return index, count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qnext_jax.data")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="tokenize and pack a corpus into ArrayRecord rows")
    prepare.add_argument("--source", default="stdlib",
                         choices=["stdlib", "text", "jsonl", "parquet"],
                         help="jsonl: .jsonl, .jsonl.gz, .jsonl.zst; parquet: .parquet files or "
                              "datasets saved with save_to_disk")
    prepare.add_argument("--paths", nargs="*", default=[], help="files, directories or globs")
    prepare.add_argument("--format", default="text", choices=["text", "chat"],
                         help="chat: conversations (a list of messages with roles) rendered by "
                              "the chat template, the loss on the assistant's tokens alone")
    prepare.add_argument("--field", default=None,
                         help="the JSONL field or Parquet column (default: text, or messages)")
    prepare.add_argument("--chat-template", default=None,
                         help="model directory or Jinja file (default: the tokenizer's directory)")
    prepare.add_argument("--tokenizer", help="tokenizer.json (default: train a byte-level BPE)")
    prepare.add_argument("--vocab-size", type=int, default=None,
                         help=f"the default BPE's size (default {DEFAULT_BPE_VOCAB}); with "
                              "--tokenizer, an upper bound checked against it (default: none)")
    prepare.add_argument("--seq-len", type=int, required=True, help="training sequence length T")
    prepare.add_argument("--eval-percent", type=float, default=2.0)
    prepare.add_argument("--out", required=True, help="output directory")
    prepare.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                         help="prepare the I-th of N parts of the input (one worker of N)")
    prepare.add_argument("--group-mib", type=float, default=256,
                         help="input MiB a unit of work (rows never cross groups)")
    join_parser = commands.add_parser("join", help="write the manifests of a prepared directory")
    join_parser.add_argument("out")
    args = parser.parse_args(argv)
    try:
        if args.command == "join":
            return _report_join(Path(args.out))
        return _prepare(args)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _prepare(args) -> int:
    config = DataConfig(source=args.source, paths=tuple(args.paths), field=args.field,
                        format=args.format, chat_template=args.chat_template,
                        tokenizer=args.tokenizer, eval_percent=args.eval_percent)
    config.check_paths()
    if args.shard[1] > 1 and args.tokenizer is None:
        raise DataError("--shard needs --tokenizer: every worker must tokenize with the same "
                        "one (train it once, e.g. by a `prepare` of a sample, and pass its "
                        "tokenizer.json)")
    out = Path(args.out).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = args.vocab_size
    if vocab_size is None and args.tokenizer is None:
        vocab_size = DEFAULT_BPE_VOCAB
    tokenizer = make_tokenizer(config, vocab_size, vocab_setting="--vocab-size")
    job = PrepareJob(source=args.source, paths=config.paths, field=config.record_field,
                     format=args.format, row_length=args.seq_len + 1,
                     eval_percent=args.eval_percent, out=out,
                     group_bytes=int(args.group_mib * (1 << 20)))
    prepare_groups(job, tokenizer, document_encoder(config, tokenizer), args.shard)
    # After the groups, whose markers a rerun with another tokenizer fails on before this
    # could replace the one the rows were made with; every worker writes the same file.
    tokenizer.save(out / TOKENIZER_FILE)
    return _report_join(out, job.splits)


def _report_join(out: Path, splits=("train", "eval")) -> int:
    totals = join(out, splits)
    if totals is None:
        print(f"{out}: groups of other shards are still missing; the last shard to finish "
              f"writes the manifest (or run `python -m qnext_jax.data join {out}`)")
        return 0
    for split, rows in totals.items():
        print(f"{split}: {rows} rows -> {out / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
