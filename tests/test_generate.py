"""Generation: cached prefill + decode against the full forward, greedy against transformers'
generate, MTP speculative decoding against plain decoding (greedy: the same tokens; sampling:
the same distribution), and the teacher-forced acceptance metric against the decoding loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from generation_models import draftable_model, tiny_config
from hf_reference import random_hf_model
from numerics import relative_error
from qnext_jax.convert import load_hf_checkpoint
from qnext_jax.generate import Generator, SamplingSettings, token_probabilities
from qnext_jax.generate.cache import commit, main_cache
from qnext_jax.generate.cached_stack import main_extend
from qnext_jax.model.transformer import Qwen3NextModel
from qnext_jax.train.mtp_acceptance import draft_matches

torch = pytest.importorskip("torch")  # the reference; absent on Python 3.12 (.ci/run)

MAX_NEW = 24


@pytest.fixture(scope="module")
def tiny_model():
    return Qwen3NextModel(tiny_config(), rngs=nnx.Rngs(0))


def test_prefill_and_decode_give_the_full_forward_logits(tiny_model):
    """Prompts of different lengths (one past the 64-token chunk) prefilled together, then
    decoded a token at a time: every row's logits are those of that row's sequence alone."""
    model, steps = tiny_model, 10
    rng = np.random.default_rng(0)
    lengths = np.array([70, 5, 33])
    rows = [rng.integers(0, model.config.vocab_size, n + steps) for n in lengths]
    prompts = np.zeros((3, 80), np.int32)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        prompts[b, :n] = row[:n]
    graph, params = nnx.split(model)

    @jax.jit
    def prefill(params, tokens, lengths):
        model = nnx.merge(graph, params)
        cache = main_cache(model.config, 3, 128)
        hidden, pending = main_extend(model, cache, tokens, lengths, fresh=True, per_position=False)
        return model.head(hidden), commit(cache, pending, lengths, stacked=True)

    @jax.jit
    def decode(params, cache, tokens):
        model = nnx.merge(graph, params)
        ones = jnp.ones(tokens.shape[:1], jnp.int32)
        hidden, pending = main_extend(model, cache, tokens[:, None], ones, fresh=False,
                                      per_position=True)
        return model.head(hidden)[:, 0], commit(cache, pending, ones, stacked=True)

    logits, cache = prefill(params, jnp.asarray(prompts), jnp.asarray(lengths, jnp.int32))
    decoded = []
    for step in range(steps):
        tokens = jnp.asarray([row[n + step] for row, n in zip(rows, lengths)], jnp.int32)
        step_logits, cache = decode(params, cache, tokens)
        decoded.append(step_logits)
    decoded = jnp.stack(decoded, axis=1)
    full = jax.jit(lambda ids: model(ids, mtp=False).logits)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        expected = full(jnp.asarray(row[None]))[0]
        assert relative_error(logits[b, :n], expected[:n]) <= 1e-5
        assert relative_error(decoded[b], expected[n: n + steps]) <= 1e-5
    np.testing.assert_array_equal(cache.length, lengths + steps)


def test_greedy_generation_equals_transformers_generate(tmp_path):
    hf_model = random_hf_model("gqa", seed=5, stress=False)
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    hf_model.save_pretrained(tmp_path)
    model = load_hf_checkpoint(tmp_path)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, 97, n)) for n in (11, 70)]
    ours = Generator(model).generate(prompts, max_new_tokens=40)
    for prompt, tokens in zip(prompts, ours.tokens):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                                    use_cache=True)
        assert tokens == out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def draft_setup():
    config = tiny_config(vocab_size=32, mtp_depth=3)
    model = draftable_model(config)
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(0, 32, n)) for n in (9, 40, 2)]  # 2 < D: depths start empty
    plain = Generator(model).generate(prompts, max_new_tokens=MAX_NEW)
    runs = {}  # depth -> speculative Generation, shared by the tests below

    def speculative(depth):
        if depth not in runs:
            runs[depth] = Generator(model, speculative=depth).generate(prompts,
                                                                     max_new_tokens=MAX_NEW)
        return runs[depth]

    return model, prompts, plain, speculative


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_speculative_greedy_equals_plain_greedy(draft_setup, depth):
    _, _, plain, speculative = draft_setup
    spec = speculative(depth)
    assert spec.tokens == plain.tokens
    assert all(len(row) == MAX_NEW for row in spec.tokens)
    # Drafts were both accepted and rejected, some rounds stopping part-way through the drafts.
    assert 0.1 < spec.acceptance[0] < 0.9
    kept = np.concatenate([b - a for a, b in zip(spec.history, spec.history[1:])])
    assert np.any((kept > 1) & (kept < depth + 1)) or depth == 1
    assert spec.rounds < plain.rounds


def test_acceptance_metric_equals_the_decoding_loop(draft_setup):
    """Each round's accepted drafts, read from the loop's token counts, are exactly the
    teacher-forced matches of the MTP chain at the round's position on the generated text."""
    model, prompts, _, speculative = draft_setup
    depth = 3
    spec = speculative(depth)

    @jax.jit
    def teacher_forced_matches(ids):
        output = model(ids)
        main = jnp.argmax(output.logits, axis=-1)
        return [draft_matches(main, jnp.argmax(logits, axis=-1), k)[0]
                for k, logits in enumerate(output.mtp_logits, start=1)]

    offered = accepted = 0
    for row, prompt in enumerate(prompts):
        sequence = np.asarray(prompt + spec.tokens[row])
        matches = [np.asarray(m) for m in teacher_forced_matches(jnp.asarray(sequence[None]))]
        for before, after in zip(spec.history, spec.history[1:]):
            n_before, n_after = before[row], after[row]
            if n_after == n_before or n_after > len(sequence):
                continue  # done, or a round past max_new_tokens (its tokens were trimmed)
            position, kept_drafts = n_before - 2, n_after - n_before - 1
            for k in range(1, min(kept_drafts + 1, depth) + 1):
                assert matches[k - 1][position] == (k <= kept_drafts), (row, position, k)
                offered += 1
                accepted += k <= kept_drafts
    assert 0 < accepted < offered


def test_speculative_sampling_keeps_the_sampling_distribution():
    """Three tokens sampled 3,000 times after one prompt, by plain sampling and by speculative
    sampling (2 drafts), against the exact distributions computed from the full forward: a
    chi-square test per marginal (first token, first pair, third token) at p >= 1e-3."""
    config = tiny_config(vocab_size=8, mtp_depth=2)
    model = draftable_model(config, seed=1)
    settings = SamplingSettings(temperature=1.3, top_k=6, top_p=0.95)
    prompt, vocab, samples = [3, 1, 4, 1, 5], 8, 3000
    forward = jax.jit(lambda ids: token_probabilities(model(ids, mtp=False).logits[:, -1], settings))
    first = np.asarray(forward(jnp.asarray([prompt])))[0]
    pairs = np.asarray(forward(jnp.asarray([prompt + [a] for a in range(vocab)])))  # [a, b]
    triples = np.asarray(forward(jnp.asarray(
        [prompt + [a, b] for a in range(vocab) for b in range(vocab)]))).reshape(vocab, vocab, vocab)
    joint_pair = first[:, None] * pairs
    third = np.einsum("ab,abc->c", joint_pair, triples)
    for depth in (0, 2):
        out = Generator(model, speculative=depth).generate(
            [prompt] * samples, max_new_tokens=3, settings=settings, seed=7)
        tokens = np.asarray(out.tokens)
        if depth:
            assert 0.2 < out.acceptance[0] < 0.95  # the rejection path runs
        for observed, expected in (
            (np.bincount(tokens[:, 0], minlength=vocab), first),
            (np.bincount(tokens[:, 0] * vocab + tokens[:, 1], minlength=vocab ** 2),
             joint_pair.reshape(-1)),
            (np.bincount(tokens[:, 2], minlength=vocab), third),
        ):
            assert observed[expected == 0].sum() == 0  # top-k / top-p excluded tokens never drawn
            assert _chi_square_p(observed, expected * samples) >= 1e-3, (depth, observed)


def _chi_square_p(observed, expected):
    """p-value of observed counts against expected ones, cells expected < 5 pooled."""
    observed, expected = np.asarray(observed, np.float64), np.asarray(expected, np.float64)
    expected = expected * observed.sum() / expected.sum()  # fp32 probabilities sum to 1 +- 1e-7
    small = expected < 5
    observed = np.append(observed[~small], observed[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    return stats.chisquare(observed[keep], expected[keep]).pvalue


def test_token_probabilities_against_numpy():
    logits = np.random.default_rng(3).normal(size=(5, 50)).astype(np.float32) * 3
    settings = SamplingSettings(temperature=0.7, top_k=20, top_p=0.8)
    ours = np.asarray(token_probabilities(jnp.asarray(logits), settings))
    for row, probs in zip(logits, ours):
        scaled = row.astype(np.float64) / 0.7
        allowed = np.argsort(-scaled)[:20]
        p = np.exp(scaled[allowed] - scaled[allowed].max())
        p /= p.sum()
        cumulative_before = np.cumsum(p) - p
        kept = allowed[cumulative_before < 0.8]
        expected = np.zeros_like(scaled)
        expected[kept] = np.exp(scaled[kept] - scaled[kept].max())
        expected /= expected.sum()
        np.testing.assert_allclose(probs, expected, atol=1e-6)
    greedy = np.asarray(token_probabilities(jnp.asarray(logits), SamplingSettings()))
    np.testing.assert_array_equal(greedy.argmax(-1), logits.argmax(-1))
    assert np.all(greedy.max(-1) == 1.0)


def test_bad_requests_are_refused(tiny_model):
    with pytest.raises(ValueError, match="MTP module"):
        Generator(load_like_without_mtp(), speculative=2)
    generator = Generator(tiny_model)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generator.generate([[1, 999]], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        generator.generate([[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_length 10 is too short"):
        generator.generate([[1, 2]], max_new_tokens=8, max_length=10)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(temperature=1.0, top_p=0.0)


def load_like_without_mtp():
    return Qwen3NextModel(tiny_config(mtp_num_hidden_layers=0), rngs=nnx.Rngs(0))


def test_eval_acceptance_counts_packed_documents(draft_setup):
    """The eval metric over a packed batch: the same counts from the logits and from the
    hidden states through the chunked argmax, and equal to a count by hand that skips
    positions whose target lies in the next document."""
    from qnext_jax.data.batch import batch_from_packed_rows
    from qnext_jax.train.mtp_acceptance import acceptance_counts

    model = draft_setup[0]
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 32, (2, 41))
    segments = np.repeat([[1] * 25 + [2] * 16], 2, axis=0)
    batch = batch_from_packed_rows(jnp.asarray(tokens), jnp.asarray(segments))
    output = model(batch.input_ids, positions=batch.positions, segment_ids=batch.segment_ids)
    from_logits = acceptance_counts(output, batch, model.head_weight())
    no_logits = output._replace(logits=None, mtp_logits=())
    from_hidden = acceptance_counts(no_logits, batch, model.head_weight())
    np.testing.assert_array_equal(from_logits, from_hidden)
    main = np.argmax(np.asarray(output.logits), -1)
    for k, logits in enumerate(output.mtp_logits, start=1):
        draft = np.argmax(np.asarray(logits), -1)
        hits = counted = 0
        for b in range(2):
            for i in range(40 - k):  # target token i+k+1 (of 41) shares token i's document
                if segments[b, i] == segments[b, i + k + 1]:
                    counted += 1
                    hits += draft[b, i] == main[b, i + k]
        assert (from_logits[0][k - 1], from_logits[1][k - 1]) == (hits, counted)


def test_decode_attention_reads_a_bf16_cache_without_copying_it():
    """The cached attention against float64 on a bf16 cache, and no conversion of the whole
    cache in its program (a step used to make an fp32 copy of every value cache)."""
    from qnext_jax.generate.cache import AttentionCache
    from qnext_jax.generate.cached_layers import attend_to_cache

    rng = np.random.default_rng(0)
    batch, kv_heads, length, dim, heads = 2, 2, 64, 16, 4
    key, value = (jnp.asarray(rng.normal(size=(batch, kv_heads, length, dim)), jnp.bfloat16)
                  for _ in range(2))
    query = jnp.asarray(rng.normal(size=(batch, 1, heads, dim)), jnp.bfloat16)
    lengths = jnp.asarray([10, 40])
    out = attend_to_cache(query, AttentionCache(key, value), lengths, dim ** -0.5)
    q, k, v = (np.asarray(x.astype(jnp.float32), np.float64) for x in (query, key, value))
    for row, n in enumerate([10, 40]):
        for head in range(heads):
            s = k[row, head // 2, : n + 1] @ q[row, 0, head] * dim ** -0.5
            p = np.exp(s - s.max())
            expected = (p / p.sum()) @ v[row, head // 2, : n + 1]
            np.testing.assert_allclose(np.asarray(out[row, 0, head], np.float64), expected,
                                       rtol=3e-2, atol=3e-2)
    jaxpr = jax.make_jaxpr(lambda q, k, v, n: attend_to_cache(q, AttentionCache(k, v), n, 0.25))(
        query, key, value, lengths)
    converted = [e for e in jaxpr.eqns if e.primitive.name == "convert_element_type"
                 and e.invars[0].aval.shape == key.shape]
    assert not converted, converted
