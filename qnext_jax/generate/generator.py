"""Generation from a model: prompts in, tokens out, with tokens/s and the acceptance rates.

The model is split once (graph + state); prefill and a loop of decode steps (or speculative
rounds) are jitted with the state they update donated. The loop runs on the device up to
`steps_per_sync` steps a call and ends early once every row is done (a stop token, checked on
the device, or max_new_tokens), so the host reads the state back once per many tokens.
Compiled functions are kept per shape, so a second call with prompts of a similar length
compiles nothing.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qnext_jax.generate.cache import main_cache, mtp_caches
from qnext_jax.generate.decoding import decode_step, prefill
from qnext_jax.generate.sampling import SamplingSettings
from qnext_jax.generate.sharding import (
    generation_rules, padded_rows, place_params, state_shardings,
)
from qnext_jax.generate.speculative import prefill_drafts, ring_size, speculative_round
from qnext_jax.generate.state import DecodeState
from qnext_jax.parallel.mesh import axis_size

log = logging.getLogger(__name__)
PROMPT_BUCKET = 16  # prompts are padded to a multiple of this: fewer prefill compilations


@dataclass
class Generation:
    tokens: list[list[int]]  # per row, the generated tokens (up to and including a stop token)
    prompt_tokens: int
    seconds: float  # decoding after the first step (prefill and compilation excluded)
    prefill_seconds: float  # compilation included on a first call
    timed_tokens: int = 0  # tokens appended in those seconds, over all rows
    rounds: int = 0  # model calls per row after prefill, summed over the rows (steps or rounds)
    acceptance: list[float] = field(default_factory=list)  # per draft depth: accepted / offered
    # n_tokens per row after prefill and after every step: what each round accepted, where.
    history: list[np.ndarray] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(len(row) for row in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.timed_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def tokens_per_round(self) -> float:
        decoded = self.new_tokens - len(self.tokens)
        return decoded / self.rounds if self.rounds else float("nan")


class Generator:
    """generate(prompts, ...) for one model; `speculative` = D drafts per round (0: plain).
    mesh: decode sharded over it (generate/sharding.py: `generation_mesh`); None: one device."""

    def __init__(self, model, *, speculative: int = 0, steps_per_sync: int = 16, mesh=None):
        if steps_per_sync < 1:
            raise ValueError(f"steps_per_sync must be >= 1, got {steps_per_sync}")
        if speculative < 0:
            raise ValueError(f"speculative must be >= 0 drafts per round, got {speculative}")
        if speculative and model.mtp is None:
            raise ValueError("speculative decoding drafts with the MTP module, and this model has "
                             "none (mtp_num_hidden_layers = 0)")
        self.config = model.config
        self.depth = speculative
        self.steps_per_sync = steps_per_sync
        self.graph, self.params = nnx.split(model)
        self.mesh, self.rules = mesh, None
        if mesh is not None:
            if axis_size(mesh, "sequence") != 1 or axis_size(mesh, "fsdp") != 1:
                raise ValueError("a generation mesh keeps sequence and fsdp at 1 "
                                 "(generate/sharding.py: generation_mesh)")
            self.rules = generation_rules(self.config, mesh)
            self.params = place_params(self.params, self.rules)
        self._compiled = {}

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int,
                 settings: SamplingSettings = SamplingSettings(), stop_tokens=(), seed: int = 0,
                 max_length: int | None = None, stop_when=None) -> Generation:
        """prompts: token ids per row (different lengths allowed). max_length: the caches'
        length (default: the longest prompt, padded, + max_new_tokens + the drafts' room).
        stop_when(tokens) -> bool: a host-side check of a row's new tokens (a stop string);
        generation ends once every row is done or stopped (the caller cuts the text)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        vocab = self.config.vocab_size
        for row, prompt in enumerate(prompts):
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {row} has token ids outside the vocabulary [0, {vocab}): "
                                 f"{bad[:5]}")
        stop_tokens = tuple(sorted(int(t) for t in stop_tokens))
        padded = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
        needed = padded + max_new_tokens + 2 * self.depth + 2
        max_length = needed if max_length is None else max_length
        if max_length < needed:
            raise ValueError(f"max_length {max_length} is too short for prompts padded to "
                             f"{padded} + {max_new_tokens} new tokens (+ {2 * self.depth + 2} "
                             f"for drafts): needs {needed}")
        if max_length > self.config.max_position_embeddings:
            log.warning("generating to %d tokens, past the model's max_position_embeddings %d",
                        max_length, self.config.max_position_embeddings)
        # On a mesh the rows are padded to a multiple of the row shards; the padding rows
        # hold one token and are done from the start.
        rows = padded_rows(len(prompts), self.mesh)
        batch = np.zeros((rows, padded), np.int32)
        for row, prompt in enumerate(prompts):
            batch[row, : len(prompt)] = prompt
        lengths = np.ones(rows, np.int32)
        lengths[: len(prompts)] = [len(p) for p in prompts]
        static = dict(settings=settings, stop_tokens=stop_tokens, max_new=max_new_tokens)
        # Built by jit: every cache a buffer of its own (the steps donate them).
        state = self._jit(functools.partial(initial_state, self.config, self.depth),
                          static_argnums=(0, 1, 2))(
            rows, max_length, settings, jnp.asarray(lengths),
            jnp.arange(rows) >= len(prompts), jax.random.key(seed))

        start = time.perf_counter()
        state = self._jitted("prefill", **static)(self.params, state, jnp.asarray(batch))
        jax.block_until_ready(state.done)
        prefilled = time.perf_counter()
        steps = self._jitted("steps", most=self.steps_per_sync, **static)
        done, n_tokens = jax.device_get((state.done, state.n_tokens))
        history, timer = [n_tokens], None  # timed from the end of the first step (compiled)
        while not done.all():
            if stop_when is not None and _all_stopped(state, done, lengths, n_tokens,
                                                      max_new_tokens, stop_when):
                break
            # One step first: its call compiles, and the timing starts after it.
            limit = 1 if timer is None else self.steps_per_sync
            state, trace, count = steps(self.params, state, jnp.int32(limit))
            trace, count, done = jax.device_get((trace, count, state.done))
            history.extend(trace[:count])
            n_tokens = history[-1]
            if timer is None:
                timer = time.perf_counter()
        tokens, n_tokens = jax.device_get((state.tokens, state.n_tokens))
        finished = time.perf_counter()
        real = len(prompts)
        history = [n[:real] for n in history]
        lengths, n_tokens = lengths[:real], n_tokens[:real]

        rows = [_trim(tokens[row, lengths[row]: n_tokens[row]], max_new_tokens, stop_tokens)
                for row in range(real)]
        timed = 0 if timer is None else int(np.sum(np.minimum(
            history[-1] - history[1], np.maximum(0, lengths + max_new_tokens - history[1]))))
        result = Generation(rows, int(lengths.sum()), 0.0 if timer is None else finished - timer,
                            prefilled - start, timed_tokens=timed, history=history)
        if self.depth:
            offered, accepted, rounds = jax.device_get((state.offered, state.accepted, state.rounds))
            result.rounds = int(rounds)
            result.acceptance = [float(a / o) if o else float("nan")
                                 for a, o in zip(accepted, offered)]
        else:
            result.rounds = result.new_tokens - len(rows)
        return result

    def _jitted(self, kind: str, **static):
        key = (kind, tuple(sorted(static.items())))
        if key not in self._compiled:
            self._compiled[key] = self._jit(
                functools.partial(_STEPS[kind], self.graph, depth=self.depth, **static),
                donate_argnums=(1,))
        return self._compiled[key]

    def _jit(self, fn, **options):
        return jit_on_mesh(fn, self.mesh, self.rules, **options)


def jit_on_mesh(fn, mesh, rules, **options):
    """jax.jit of a generation function; on a mesh traced under it (the MoE's and attention's
    shard_map read it), the DecodeState it returns (alone or first) kept on its shards."""
    if mesh is None:
        return jax.jit(fn, **options)
    abstract_mesh = mesh.abstract_mesh

    def on_mesh(*args):
        with jax.sharding.use_abstract_mesh(abstract_mesh):
            out = fn(*args)
        alone = isinstance(out, DecodeState)  # else (state, *more)
        state = out if alone else out[0]
        state = jax.lax.with_sharding_constraint(state, state_shardings(state, rules))
        return state if alone else (state, *out[1:])

    return jax.jit(on_mesh, **options)


def initial_state(config, depth: int, batch: int, max_length: int, settings: SamplingSettings,
                  lengths, done, key) -> DecodeState:
    """Empty caches for `batch` rows of up to `max_length` tokens, `depth` MTP drafts."""
    zeros = jnp.zeros((batch,), jnp.int32)
    draft_vocab = 0 if settings.greedy else config.vocab_size  # the rejection rule's q
    return DecodeState(
        main=main_cache(config, batch, max_length),
        mtp=mtp_caches(config, batch, max_length, depth) if depth else (),
        tokens=jnp.zeros((batch, max_length), jnp.int32),
        n_tokens=zeros, prompt_length=lengths, done=done, key=key,
        drafts=jnp.zeros((batch, depth), jnp.int32),
        draft_probs=jnp.zeros((batch, depth, draft_vocab), jnp.float32),
        rings=tuple(jnp.zeros((batch, ring_size(depth), config.hidden_size),
                              jnp.dtype(config.dtype)) for _ in range(depth)),
        accepted=jnp.zeros((depth,), jnp.int32), offered=jnp.zeros((depth,), jnp.int32),
        rounds=jnp.zeros((), jnp.int32),
    )


def _prefill(graph, params, state, prompts, *, depth, **static):
    model = nnx.merge(graph, params)
    state, hidden = prefill(model, state, prompts, **static)
    if depth:
        state = prefill_drafts(model, state, hidden, settings=static["settings"], depth=depth)
    return state


def _steps(graph, params, state, limit, *, depth, most, **static):
    """Up to `limit` (<= most) decode steps (speculative rounds with depth > 0) on the device,
    stopping early once every row is done: one host round trip for many tokens. Returns
    (state, each step's n_tokens [most, B] (the first `count` rows written), count)."""
    model = nnx.merge(graph, params)

    def one(state):
        if depth:
            return speculative_round(model, state, depth=depth, **static)
        return decode_step(model, state, **static)

    trace = jnp.zeros((most,) + state.n_tokens.shape, jnp.int32)

    def more(carry):
        count, state, _ = carry
        return (count < jnp.minimum(limit, most)) & ~jnp.all(state.done)

    def step(carry):
        count, state, trace = carry
        state = one(state)
        return count + 1, state, trace.at[count].set(state.n_tokens)

    count, state, trace = jax.lax.while_loop(more, step, (jnp.int32(0), state, trace))
    return state, trace, count


_STEPS = {"prefill": _prefill, "steps": _steps}


def _all_stopped(state, done, lengths, n_tokens, max_new: int, stop_when) -> bool:
    tokens = jax.device_get(state.tokens)
    return all(done[row] or stop_when([int(t) for t in tokens[row, lengths[row]:
                                                                n_tokens[row]][:max_new]])
               for row in range(len(done)))


def _trim(row, max_new: int, stop_tokens) -> list[int]:
    row = [int(t) for t in row[:max_new]]
    for i, token in enumerate(row):
        if token in stop_tokens:
            return row[: i + 1]
    return row
