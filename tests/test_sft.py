"""Supervised fine-tuning data: conversations rendered by the chat template, tokenized, and the
assistant's tokens masked exactly as transformers' `apply_chat_template(...,
return_assistant_tokens_mask=True)` masks them; templates without {% generation %} blocks by
prefixes; packed rows whose loss mask counts the answers alone."""

import json

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from qnext_jax.data.__main__ import main
from qnext_jax.data.batch import batch_from_packed_rows
from qnext_jax.data.build import DataConfig, packed_rows
from qnext_jax.data.chat_template import ChatTemplate
from qnext_jax.data.pipeline import ArrayRecordRows
from qnext_jax.data.sft import ConversationEncoder
from qnext_jax.data.sources import DataError
from qnext_jax.data.tokenizer import TextTokenizer

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen's templates write it; the assistant's text (and its end of turn) marked.
MARKED = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.role == 'assistant' %}"
    "{% generation %}{{- message.content + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else %}{{- message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
UNMARKED = MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")
# Renders the last assistant turn differently from earlier ones (as reasoning templates do).
LAST_TURN_DIFFERS = UNMARKED.replace("{{- message.content + '<|im_end|>\\n' }}{%- else %}",
                                     "{{- message.content + ('!' if loop.last else '') + "
                                     "'<|im_end|>\\n' }}{%- else %}")

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "What is two plus two?"},
     {"role": "assistant", "content": "Four."},
     {"role": "user", "content": "And times three?"},
     {"role": "assistant", "content": "Twelve, héhé ✓"}],
    [{"role": "user", "content": "hello"},
     {"role": "assistant", "content": "hi there, how can I help"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [m["content"] for c in CONVERSATIONS for m in c] * 20
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    return TextTokenizer(tok, "test BPE")


def transformers_reference(tokenizer, template, conversation):
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast(tokenizer_object=tokenizer.tokenizer)
    out = reference.apply_chat_template(conversation, chat_template=template, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_assistant_mask_equals_transformers(tokenizer, conversation):
    encoder = ConversationEncoder(tokenizer, ChatTemplate(MARKED))
    (ids, mask), = encoder.encode([conversation])
    want_ids, want_mask = transformers_reference(tokenizer, MARKED, conversation)
    assert list(ids) == want_ids + [tokenizer.end_of_text_id]
    assert list(mask) == want_mask + [0]
    assert 0 < sum(want_mask) < len(want_mask)
    answers = tokenizer.decode(ids[mask == 1])
    assert all(m["content"] in answers for m in conversation if m["role"] == "assistant")


def test_unmarked_templates_by_prefixes(tokenizer):
    """Without {% generation %} the answers are found by rendering prefixes: the same mask as
    the marked template's; a template that renders a turn differently later is refused."""
    marked = ConversationEncoder(tokenizer, ChatTemplate(MARKED)).encode(CONVERSATIONS)
    by_prefix = ConversationEncoder(tokenizer, ChatTemplate(UNMARKED)).encode(CONVERSATIONS)
    for (ids, mask), (ids2, mask2) in zip(marked, by_prefix):
        np.testing.assert_array_equal(ids, ids2)
        np.testing.assert_array_equal(mask, mask2)
    with pytest.raises(DataError, match="renders message 2 of a conversation differently"):
        ConversationEncoder(tokenizer, ChatTemplate(LAST_TURN_DIFFERS)).encode(CONVERSATIONS[:1])


def test_parquet_structs_render_as_jsonl(tmp_path, tokenizer):
    """A Parquet column of messages gives every message every key (None where it had none);
    those are dropped, as transformers drops them, so a template testing `is defined` renders
    the conversation as from JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    template = MARKED.replace("{{- '<|im_start|>' + message.role + '\\n' }}",
                              "{{- '<|im_start|>' + message.role + ('/' + message.name if "
                              "message.name is defined else '') + '\\n' }}")
    conversation = [{"role": "user", "content": "hello", "name": "ann"},
                    {"role": "assistant", "content": "hi there"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": conversation}) + "\n")
    pq.write_table(pa.table({"messages": [conversation]}), tmp_path / "chat.parquet")
    model = write_model_dir(tmp_path / "model", tokenizer, template)
    rows = []
    for source, name in (("jsonl", "chat.jsonl"), ("parquet", "chat.parquet")):
        config = DataConfig(source=source, paths=(str(tmp_path / name),), format="chat",
                            tokenizer=str(model), eval_percent=0)
        rows.append(packed_rows(config, tokenizer, 64, "train")[0])
    for a, b in zip(*rows):
        np.testing.assert_array_equal(a, b)
    assert "/ann" in tokenizer.decode(rows[0][0]) and "assistant/" not in tokenizer.decode(rows[0][0])


def write_model_dir(directory, tokenizer, template):
    directory.mkdir()
    tokenizer.save(directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return directory


def test_packed_conversations_train_on_the_answers_alone(tmp_path, tokenizer):
    """JSONL and Parquet conversations, packed at start-up and by `prepare --format chat`: the
    same rows; a batch's loss counts exactly the targets that are assistant tokens of the same
    conversation."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    model = write_model_dir(tmp_path / "model", tokenizer, MARKED)
    conversations = CONVERSATIONS * 6
    with (tmp_path / "chat.jsonl").open("w") as file:
        for c in conversations:
            file.write(json.dumps({"messages": c}) + "\n")
    pq.write_table(pa.table({"messages": conversations}), tmp_path / "chat.parquet")

    rows = {}
    for source, name in (("jsonl", "chat.jsonl"), ("parquet", "chat.parquet")):
        config = DataConfig(source=source, paths=(str(tmp_path / name),), format="chat",
                            tokenizer=str(model), eval_percent=0)
        rows[source] = packed_rows(config, tokenizer, 24, "train")
    assert len(rows["jsonl"]) == len(rows["parquet"])
    for a, b in zip(rows["jsonl"][:len(rows["jsonl"])], rows["parquet"][:len(rows["parquet"])]):
        np.testing.assert_array_equal(a, b)

    assert main(["prepare", "--source", "jsonl", "--format", "chat", "--paths",
                 str(tmp_path / "chat.jsonl"), "--tokenizer", str(model), "--seq-len", "23",
                 "--eval-percent", "0", "--out", str(tmp_path / "prepared")]) == 0
    stored = ArrayRecordRows(tmp_path / "prepared" / "train")
    memory = rows["jsonl"]
    assert len(stored) == len(memory)
    for i in range(len(stored)):
        for got, want in zip(stored[i], memory[i]):
            np.testing.assert_array_equal(got, want)

    # The loss mask: targets that are the assistant's tokens, within one conversation.
    encoded = ConversationEncoder(tokenizer, ChatTemplate(MARKED)).encode(conversations)
    stream_ids = np.concatenate([ids for ids, _ in encoded])
    stream_mask = np.concatenate([mask for _, mask in encoded])
    batch = batch_from_packed_rows(memory.tokens, memory.segment_ids, memory.assistant_mask)
    counted = batch.targets[batch.loss_mask == 1]
    total = 0
    for row in range(len(memory.tokens)):
        for t in range(memory.tokens.shape[1] - 1):
            same = memory.segment_ids[row, t] == memory.segment_ids[row, t + 1] != 0
            want = same and memory.assistant_mask[row, t + 1] == 1
            assert batch.loss_mask[row, t] == want
            total += want
    assert total == len(counted) > 0
    # Every assistant token but those that open a row (no input before them) is counted.
    assert stream_mask.sum() - np.sum(memory.assistant_mask[:, 0]) == total
    assert len(stream_ids) == np.sum(memory.segment_ids > 0)


def test_chat_errors(tmp_path, tokenizer):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": "not a list"}) + "\n")
    model = write_model_dir(tmp_path / "model", tokenizer, MARKED)
    config = DataConfig(source="jsonl", paths=(str(tmp_path / "bad.jsonl"),), format="chat",
                        tokenizer=str(model), eval_percent=0)
    with pytest.raises(DataError, match="bad.jsonl:1: field 'messages' is not a conversation"):
        packed_rows(config, tokenizer, 16, "train")
    with pytest.raises(DataError, match="data.format chat needs data.tokenizer"):
        DataConfig(source="jsonl", paths=("x.jsonl",), format="chat")
    with pytest.raises(DataError, match="data.format chat reads conversations from jsonl or "
                                        "parquet"):
        DataConfig(source="text", paths=("x.txt",), format="chat", tokenizer="t")
    with pytest.raises(DataError, match="chat template .*missing.jinja does not exist"):
        ChatTemplate.from_path(tmp_path / "missing.jinja")


def test_fine_tuning_run_on_conversations(tmp_path, tokenizer):
    """The training loop on chat data: two steps of a tiny model from JSONL conversations."""
    import io

    import qnext_jax.train.loop as loop
    from conftest import REPO_ROOT
    from qnext_jax.train.run_config import load_run_config

    model = write_model_dir(tmp_path / "model", tokenizer, MARKED)
    with (tmp_path / "chat.jsonl").open("w") as file:
        for c in CONVERSATIONS * 40:
            file.write(json.dumps({"messages": c}) + "\n")
    run = tmp_path / "run"
    config = load_run_config(None, [
        f"model.preset={REPO_ROOT / 'configs' / 'tiny.yaml'}", "model.num_hidden_layers=4",
        "model.vocab_size=512", "data.source=jsonl", f"data.paths=[{tmp_path}/chat.jsonl]",
        "data.format=chat", f"data.tokenizer={model / 'tokenizer.json'}", "data.eval_percent=0",
        "train.steps=2", "train.batch_size=8", "train.seq_len=32", "train.log_every=1",
        "train.eval_every=0", f"train.run_dir={run}"])
    loop.train(config, run, stream=io.StringIO())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and all(np.isfinite(entry["loss"]) for entry in logged)


def test_sft_configs_load_and_the_shipped_template_marks_answers(tokenizer, tmp_path):
    from conftest import REPO_ROOT
    from qnext_jax.train.run_config import load_run_config

    model = write_model_dir(tmp_path / "model", tokenizer, MARKED)
    for name in ("sft_small.yaml", "sft_80b_h100x64.yaml"):
        config = load_run_config(REPO_ROOT / "configs" / name, [
            "data.paths=[chat.jsonl]", f"data.tokenizer={model / 'tokenizer.json'}"])
        assert config.data.format == "chat" and config.data.record_field == "messages"
    small = load_run_config(REPO_ROOT / "configs" / "sft_small.yaml", [
        "data.paths=[chat.jsonl]", f"data.tokenizer={model / 'tokenizer.json'}"])
    shipped = small.data.chat_encoder(tokenizer)
    assert shipped.template.marks_generation
    for (ids, mask), (ids2, mask2) in zip(
            shipped.encode(CONVERSATIONS),
            ConversationEncoder(tokenizer, ChatTemplate(MARKED)).encode(CONVERSATIONS)):
        np.testing.assert_array_equal(ids, ids2)
        np.testing.assert_array_equal(mask, mask2)
