"""`python -m qnext_jax.data prepare ...`: tokenize and pack a corpus once into ArrayRecord rows
(train/ and eval/), with its tokenizer.json beside them, for `data.source=prepared`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qnext_jax.data.build import TOKENIZER_FILE, DataConfig, make_tokenizer, packed_rows
from qnext_jax.data.pipeline import write_array_record_rows
from qnext_jax.data.sources import DataError

DEFAULT_BPE_VOCAB = 8192


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qnext_jax.data")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="tokenize and pack a corpus into ArrayRecord rows")
    prepare.add_argument("--source", default="stdlib", choices=["stdlib", "text", "jsonl"])
    prepare.add_argument("--paths", nargs="*", default=[], help="files or globs")
    prepare.add_argument("--jsonl-field", default="text")
    prepare.add_argument("--tokenizer", help="tokenizer.json (default: train a byte-level BPE)")
    prepare.add_argument("--vocab-size", type=int, default=None,
                         help=f"the default BPE's size (default {DEFAULT_BPE_VOCAB}); with "
                              "--tokenizer, an upper bound checked against it (default: none)")
    prepare.add_argument("--seq-len", type=int, required=True, help="training sequence length T")
    prepare.add_argument("--eval-percent", type=float, default=2.0)
    prepare.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    try:
        config = DataConfig(source=args.source, paths=tuple(args.paths), jsonl_field=args.jsonl_field,
                            tokenizer=args.tokenizer, eval_percent=args.eval_percent)
        config.check_paths()
        out = Path(args.out).expanduser().absolute()
        out.mkdir(parents=True, exist_ok=True)
        vocab_size = args.vocab_size
        if vocab_size is None and args.tokenizer is None:
            vocab_size = DEFAULT_BPE_VOCAB
        tokenizer = make_tokenizer(config, vocab_size, vocab_setting="--vocab-size")
        tokenizer.save(out / TOKENIZER_FILE)  # replaces one an earlier `prepare` left there
        for split in ("train", "eval") if args.eval_percent > 0 else ("train",):
            rows = packed_rows(config, tokenizer, args.seq_len + 1, split)
            write_array_record_rows(out / split, rows.tokens, rows.segment_ids,
                                    extra_metadata={"tokenizer": tokenizer.source})
            print(f"{split}: {len(rows)} rows of {args.seq_len + 1} tokens -> {out / split}")
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
