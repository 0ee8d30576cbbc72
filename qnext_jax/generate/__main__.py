"""Command line: sample from a trained run or a Hugging Face directory.

    python -m qnext_jax.generate RUN_OR_HF_DIR --prompt "def f(x):" --max-new-tokens 64 \
        [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 0] [--speculative 2]
    python -m qnext_jax.generate HF_DIR --chat --prompt "What is a delta rule?" [--system "..."]
    python -m qnext_jax.generate HF_DIR --mesh tensor=4 --mesh expert=2 --prompt ...

Prints each prompt's continuation, then the decode speed (tokens/s after the first token),
and with --speculative the tokens kept per verification and the acceptance rate per depth.
Rows stop at the model's end tokens (config.json's and generation_config.json's eos_token_id,
the tokenizer's end-of-text) and at --stop strings; sampling defaults to generation_config.json
(greedy without one). --chat renders each prompt as a user turn with the tokenizer's chat
template (tokenizer_config.json or chat_template.jinja) and the assistant's header. --mesh
splits decoding over the devices (tensor over heads and widths, expert over the routed experts,
data over the rows), each parameter read straight into its shards.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from qnext_jax.config import ConfigError
from qnext_jax.data.chat_template import ChatTemplate
from qnext_jax.data.sources import DataError
from qnext_jax.generate.generator import Generator
from qnext_jax.generate.sampling import SamplingSettings
from qnext_jax.generate.sharding import generation_mesh, mesh_sizes
from qnext_jax.generate.sources import load_for_generation
from qnext_jax.generate.stopping import (
    cut_at_stop_strings, read_generation_config, sampling_defaults, stop_token_ids,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qnext_jax.generate",
                                     description="Generate text with a qnext_jax model.")
    parser.add_argument("model_dir", help="a run directory (its latest checkpoint and tokenizer) "
                        "or a Hugging Face directory")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    prompts.add_argument("--prompt-file", help="a file of prompts, one per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float,
                        help="0 = greedy (default: generation_config.json's, else greedy)")
    parser.add_argument("--top-k", type=int, help="0 = off (default: generation_config.json's)")
    parser.add_argument("--top-p", type=float, help="1 = off (default: generation_config.json's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speculative", type=int, default=0, metavar="D",
                        help="MTP drafts per verification (0: plain decoding)")
    parser.add_argument("--step", type=int, help="a run's checkpoint step (default: the latest)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="the parameters' dtype (auto: the model's compute dtype, bf16 for "
                             "the released 80B), cast tensor by tensor as they are read")
    parser.add_argument("--no-stop", action="store_true",
                        help="do not stop at the model's end tokens")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="also stop where the text contains this (repeat for several)")
    parser.add_argument("--chat", action="store_true",
                        help="render each prompt as a user turn with the chat template")
    parser.add_argument("--system", help="with --chat: a system turn before each prompt")
    parser.add_argument("--mesh", action="append", default=[], metavar="AXIS=SIZE",
                        help="decode on a mesh of this size along data, tensor or expert "
                             "(repeat for several; the others are 1). Default: one device")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        texts = _prompts(args)
        if args.system and not args.chat:
            raise ConfigError("--system adds a system turn to --chat prompts; add --chat")
        generation_config = read_generation_config(args.model_dir)
        defaults = sampling_defaults(generation_config)
        settings = SamplingSettings(*(defaults[name] if value is None else value for name, value in
                                      (("temperature", args.temperature), ("top_k", args.top_k),
                                       ("top_p", args.top_p))))
        mesh = generation_mesh(mesh_sizes(args.mesh)) if args.mesh else None
        model, tokenizer, source = load_for_generation(args.model_dir, step=args.step,
                                                       dtype=args.dtype, mesh=mesh)
        if tokenizer is None:
            raise ConfigError(f"{args.model_dir} has no tokenizer.json to encode the prompts")
        print(f"model: {source}", flush=True)
        inputs = texts
        if args.chat:
            template = ChatTemplate.from_model_dir(args.model_dir)
            system = [{"role": "system", "content": args.system}] if args.system else []
            inputs = [template.render([*system, {"role": "user", "content": text}],
                                      add_generation_prompt=True) for text in texts]
        prompts = [tokenizer.tokenizer.encode(t, add_special_tokens=False).ids for t in inputs]
        stop = () if args.no_stop else stop_token_ids(model.config, generation_config,
                                                      tokenizer.end_of_text_id)
        stop_when = None
        if args.stop:
            stop_when = lambda tokens: cut_at_stop_strings(  # noqa: E731
                tokenizer.decode(tokens), args.stop)[1]
        result = Generator(model, speculative=args.speculative, mesh=mesh).generate(
            prompts, max_new_tokens=args.max_new_tokens, settings=settings, stop_tokens=stop,
            seed=args.seed, stop_when=stop_when)
    except (ConfigError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for text, shown, tokens in zip(texts, inputs, result.tokens):
        continuation, _ = cut_at_stop_strings(tokenizer.decode(tokens), args.stop)
        print(f"--- {text!r}\n{shown}{continuation}")
    print(f"{result.new_tokens} new tokens, prefill {result.prefill_seconds:.2f} s "
          f"(compilation included), decode {result.tokens_per_second:,.1f} tokens/s")
    if args.speculative:
        rates = ", ".join(f"depth {k}: {rate:.3f}" for k, rate in enumerate(result.acceptance, 1))
        print(f"speculative: {result.tokens_per_round:.2f} tokens per verification; "
              f"acceptance {rates}")
    return 0


def _prompts(args) -> list[str]:
    if args.prompt:
        return args.prompt
    path = Path(args.prompt_file)
    if not path.is_file():
        raise ConfigError(f"prompt file {path} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"prompt file {path} holds no prompt")
    return lines


if __name__ == "__main__":
    sys.exit(main())
