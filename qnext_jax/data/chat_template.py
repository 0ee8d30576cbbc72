"""A model's chat template: conversations rendered to the text the model was trained on.

Hugging Face tokenizers ship their template as Jinja source (`chat_template` in
`tokenizer_config.json`, or a `chat_template.jinja` file beside it). We render it with jinja2
configured as transformers configures it — a sandboxed environment with `trim_blocks` and
`lstrip_blocks`, the loop-control extension, a `tojson` that keeps non-ASCII text and takes
indent/separators/sort_keys, `raise_exception`, `strftime_now` — so that `--chat` prompts (and
supervised fine-tuning data) are byte for byte what `apply_chat_template` gives, without
transformers at run time. The template sees `messages`, `tools`, `documents`,
`add_generation_prompt` and the tokenizer's special tokens (`bos_token`, `eos_token`, ...).
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

from qnext_jax.data.sources import DataError

TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                   "mask_token")


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationSpans(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks what the assistant says (templates
        written for fine-tuning have it): rendered as its body, whose character span in the
        output is recorded while `spans` is a list (render_with_spans)."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            environment.extend(generation_spans=self)
            self.spans = self.blocks = None

        def parse(self, parser):
            line = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(line)

        def _record(self, caller):
            text = caller()
            if self.spans is not None:
                start = sum(len(block) for block in self.blocks)
                self.spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols,
                                                            GenerationSpans])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return environment


class ChatTemplate:
    """render(messages) -> str. messages: [{"role": ..., "content": ...}, ...]."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None,
                 origin: str = "the chat template"):
        import jinja2

        self.source = source
        self.origin = origin
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as error:
            raise DataError(f"{origin} is not a valid Jinja template: {error}") from None

    @classmethod
    def from_model_dir(cls, directory) -> "ChatTemplate":
        """The template of a Hugging Face (or exported run) directory: `chat_template.jinja`, or
        `chat_template` in `tokenizer_config.json` (a string, or a list of named templates of
        which "default" is used), with the special tokens that config names."""
        directory = Path(directory)
        config_path = directory / TOKENIZER_CONFIG
        config = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as error:
                raise DataError(f"{config_path} is not valid JSON: {error}") from None
        special = {}
        for name in _SPECIAL_TOKENS:
            token = config.get(name)
            if isinstance(token, dict):  # an AddedToken written out
                token = token.get("content")
            if isinstance(token, str):
                special[name] = token
        if (directory / TEMPLATE_FILE).is_file():
            path = directory / TEMPLATE_FILE
            return cls(path.read_text(), special, str(path))
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {entry.get("name"): entry.get("template") for entry in source}
            source = named.get("default")
        if not isinstance(source, str):
            raise DataError(f"{directory} has no chat template: expected {TEMPLATE_FILE} or a "
                            f"\"chat_template\" string in {TOKENIZER_CONFIG}")
        return cls(source, special, f"the chat template of {config_path}")

    @classmethod
    def from_path(cls, path) -> "ChatTemplate":
        """A model directory (as from_model_dir) or a Jinja file of the template alone."""
        path = Path(path).expanduser()
        if path.is_dir():
            return cls.from_model_dir(path)
        if not path.is_file():
            raise DataError(f"chat template {path} does not exist (expected a model directory "
                            f"or a Jinja file)")
        return cls(path.read_text(), origin=str(path))

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False, tools=None,
               documents=None, **variables) -> str:
        """The conversation as text. add_generation_prompt: end with the assistant's header, for
        the model to answer. variables: anything else the template reads (enable_thinking...)."""
        import jinja2

        _check_messages(messages)
        try:
            return self._template.render(
                messages=messages, tools=tools, documents=documents,
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **variables})
        except jinja2.exceptions.TemplateError as error:
            raise DataError(f"{self.origin} refused the conversation: {error}") from None

    @property
    def marks_generation(self) -> bool:
        """Whether the template marks the assistant's text with {% generation %} blocks."""
        return re.search(r"{%-?\s*generation\s*-?%}", self.source) is not None

    def render_with_spans(self, messages: list[dict], **variables) -> tuple[str, list]:
        """(text, [(start, end), ...]): the conversation and the character spans of its
        {% generation %} blocks — what the assistant says, for a loss on it alone."""
        import jinja2

        _check_messages(messages)
        tracker = self._template.environment.generation_spans
        spans, blocks = [], []
        tracker.spans, tracker.blocks = spans, blocks
        try:
            for block in self._template.generate(
                    messages=messages, tools=variables.pop("tools", None),
                    documents=variables.pop("documents", None),
                    add_generation_prompt=variables.pop("add_generation_prompt", False),
                    **{**self.special_tokens, **variables}):
                blocks.append(block)
        except jinja2.exceptions.TemplateError as error:
            raise DataError(f"{self.origin} refused the conversation: {error}") from None
        finally:
            tracker.spans = tracker.blocks = None
        return "".join(blocks), spans


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m
                                                  for m in messages):
        raise DataError("a conversation is a list of messages, each a dict with a \"role\" "
                        f"(and usually \"content\"); got {messages!r:.200}")
