"""Data preparation and loading at scale, on this machine:

1. `python -m qnext_jax.data prepare` on JSONL corpora of two sizes (10x apart), each in a
   process of its own: wall time, tokens/s (and per core), and peak RSS — which must not grow
   with the corpus (the streaming path holds one text batch and one partial row);
2. the peer: the tokenizers library's own batch encoding (`Tokenizer.encode_batch_fast`, all cores)
   of the same text held in memory, nothing read, packed or written: prepare's ceiling;
3. the loader: prepared ArrayRecord rows through the training's grain pipeline (shuffled,
   batched, masks built) in tokens/s, beside the default replica's train step (configs/small.yaml,
   8 x 256 tokens, one CPU device) timed in the same run: the loader must outrun it.

    python benchmarks/data_prepare.py                     # 10 and 100 MB
    python benchmarks/data_prepare.py --megabytes 20 200 --no-step

The corpus is the embedded one (the Python standard library's sources and docs) repeated to
size, as `.jsonl.zst` files of about 16 MB; the tokenizer is the default replica's byte-level
BPE of 8,192 tokens trained on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
ROW_TOKENS = 256
FILE_BYTES = 16 << 20

# Runs prepare in this process and reports its peak resident memory (ru_maxrss, KiB on Linux).
_MEASURED = """
import resource, runpy, sys
sys.argv = ["qnext_jax.data"] + sys.argv[1:]
try:
    runpy.run_module("qnext_jax.data", run_name="__main__")
except SystemExit as exit:
    if exit.code:
        raise
print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_corpus(directory: Path, megabytes: float, texts: list[str]) -> int:
    import zstandard

    directory.mkdir(parents=True)
    target, written, index, part = int(megabytes * (1 << 20)), 0, 0, 0
    while written < target:
        lines, size = [], 0
        while size < FILE_BYTES and written + size < target:
            line = json.dumps({"text": texts[index % len(texts)]}) + "\n"
            lines.append(line)
            size += len(line)
            index += 1
        (directory / f"part{part:04d}.jsonl.zst").write_bytes(
            zstandard.ZstdCompressor(level=3).compress("".join(lines).encode()))
        written += size
        part += 1
    return written


def run_prepare(corpus: Path, tokenizer: Path, out: Path) -> dict:
    command = [sys.executable, "-c", _MEASURED, "prepare", "--source", "jsonl", "--paths",
               str(corpus / "*.jsonl.zst"), "--tokenizer", str(tokenizer), "--seq-len",
               str(ROW_TOKENS - 1), "--eval-percent", "0", "--out", str(out)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    peak = int(result.stdout.split("PEAK_RSS_KIB")[1].split()[0])
    manifest = json.loads((out / "train" / "rows.json").read_text())
    return {"seconds": seconds, "tokens": manifest["tokens"], "rows": manifest["rows"],
            "tokens_per_second": manifest["tokens"] / seconds, "peak_rss_mib": peak / 1024}


def tokenizer_alone(tokenizer_path: Path, corpus: Path) -> dict:
    """The peer: the library's fastest batch encoding (encode_batch_fast: no offsets, all
    cores) of the corpus' texts already in memory."""
    import zstandard
    from tokenizers import Tokenizer

    texts = []
    for path in sorted(corpus.glob("*.jsonl.zst")):
        data = zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read()
        texts += [json.loads(line)["text"] for line in data.decode().splitlines()]
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    start, tokens = time.perf_counter(), 0
    for first in range(0, len(texts), 4096):
        tokens += sum(len(e.ids) for e in tokenizer.encode_batch_fast(
            texts[first:first + 4096], add_special_tokens=False))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds}


def loader_rate(prepared: Path, batches: int = 400) -> dict:
    from qnext_jax.data.pipeline import ArrayRecordRows, batch_dataset

    iterator = iter(batch_dataset(ArrayRecordRows(prepared / "train"), 8, seed=0))
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    seconds = time.perf_counter() - start
    tokens = batches * batch.input_ids.size
    return {"batches": batches, "tokens_per_second": tokens / seconds}


def step_rate() -> dict:
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from cpu_training_throughput import random_rows, time_ours

    from qnext_jax.train.run_config import load_run_config

    config = load_run_config(REPO_ROOT / "configs" / "small.yaml").model
    timed = time_ours(config, random_rows(config.vocab_size, 8, ROW_TOKENS, 7), warmup=2)
    return {"seconds_per_step": timed["seconds_per_step"],
            "tokens_per_second": 8 * ROW_TOKENS / timed["seconds_per_step"]}


def main():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the train step on this CPU
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, nargs=2, default=(10.0, 100.0))
    parser.add_argument("--no-step", action="store_true", help="skip timing the train step")
    args = parser.parse_args()
    from qnext_jax.data.sources import stdlib_corpus
    from qnext_jax.data.tokenizer import train_byte_level_bpe

    cores = len(os.sched_getaffinity(0))
    texts = [text for _, text in stdlib_corpus("train")]
    rng = np.random.default_rng(0)
    texts = [texts[i] for i in rng.permutation(len(texts))]
    results = {"cores": cores}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        tokenizer_path = scratch / "tokenizer.json"
        train_byte_level_bpe(texts, 8192).save(tokenizer_path)
        for megabytes in args.megabytes:
            corpus = scratch / f"corpus{megabytes:g}"
            size = write_corpus(corpus, megabytes, texts)
            run = run_prepare(corpus, tokenizer_path, scratch / f"prepared{megabytes:g}")
            run.update(corpus_mib=size / (1 << 20),
                       tokens_per_second_per_core=run["tokens_per_second"] / cores)
            results[f"prepare_{megabytes:g}mb"] = run
            print(json.dumps({f"prepare {megabytes:g} MB": run}), flush=True)
        small = scratch / f"corpus{args.megabytes[0]:g}"
        results["tokenizer_alone"] = tokenizer_alone(tokenizer_path, small)
        results["tokenizer_alone"]["tokens_per_second_per_core"] = (
            results["tokenizer_alone"]["tokens_per_second"] / cores)
        print(json.dumps({"tokenizer alone": results["tokenizer_alone"]}), flush=True)
        results["loader"] = loader_rate(scratch / f"prepared{args.megabytes[0]:g}")
        print(json.dumps({"loader": results["loader"]}), flush=True)
    if not args.no_step:
        results["train_step"] = step_rate()
        print(json.dumps({"train step": results["train_step"]}), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
