"""Conversations for supervised fine-tuning: rendered with the model's chat template (the
renderer of generation's `--chat`), tokenized, and a mask of the assistant's tokens, so the
loss is on the answers alone (Batch.loss_mask).

Which characters are the assistant's:
- a template with `{% generation %}` blocks says it (transformers' convention: this is how
  `apply_chat_template(..., return_assistant_tokens_mask=True)` finds them, and the tokens are
  chosen as it chooses them: from the token holding a block's first character to the token
  holding its last);
- a template without them (Qwen3-Next's own) is rendered by prefixes: assistant message i spans
  from the end of messages[:i] rendered with the generation prompt to the end of messages[:i+1],
  checked to be a prefix of the whole conversation. A template for which that does not hold
  (one that renders earlier turns differently once later ones exist) is refused, naming the
  conversation: give it {% generation %} blocks.
"""

from __future__ import annotations

import numpy as np

from qnext_jax.data.chat_template import ChatTemplate
from qnext_jax.data.sources import DataError
from qnext_jax.data.tokenizer import TextTokenizer


class ConversationEncoder:
    """encode(conversations) -> per conversation (ids, assistant mask), int32, each followed by
    the end-of-text separator (mask 0), as documents are."""

    def __init__(self, tokenizer: TextTokenizer, template: ChatTemplate):
        self.tokenizer, self.template = tokenizer, template

    def spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of the assistant's text."""
        # Keys set to None are left out, as apply_chat_template leaves them out: Parquet gives
        # every message every key of its struct column (None where a message has none), which
        # a template testing `is defined` would otherwise see.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        if self.template.marks_generation:
            return self.template.render_with_spans(messages)
        text = self.template.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.template.render(messages[:i], add_generation_prompt=True)
            through = self.template.render(messages[:i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise DataError(
                    f"{self.template.origin} renders message {i} of a conversation differently "
                    "once later messages follow, so its answers cannot be found by prefixes; "
                    "use a template that marks them with {% generation %} blocks "
                    f"(conversation: {messages!r:.160})")
            if len(through) > len(before):
                spans.append((len(before), len(through)))
        return text, spans

    def encode(self, conversations: list[list[dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
        rendered = [self.spans(messages) for messages in conversations]
        encodings = self.tokenizer.tokenizer.encode_batch([text for text, _ in rendered],
                                                          add_special_tokens=False)
        out = []
        for encoding, (_, spans) in zip(encodings, rendered):
            ids = np.asarray(encoding.ids + [self.tokenizer.end_of_text_id], np.int32)
            mask = np.zeros(len(ids), np.int32)
            for start, end in spans:
                first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
                if first is None:
                    break
                # transformers' rule, kept to give its masks: a span whose last character has
                # no token (or lies in token 0) runs to the end of the text.
                mask[first:(last + 1 if last else len(encoding.ids))] = 1
            out.append((ids, mask))
        return out
