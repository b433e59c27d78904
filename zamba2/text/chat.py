"""Chat text: special-token-aware encoding, token strings for logprobs, chat templates.

Chat templates are the Jinja2 strings of the checkpoint's tokenizer_config.json ("chat_template"), rendered
the way transformers' `apply_chat_template` does (sandboxed, trim_blocks + lstrip_blocks, with
`raise_exception`, `bos_token`, `eos_token` and `add_generation_prompt`). A rendered chat contains special
tokens as text ("<s>", "</s>", ...), so `TextCodec.encode` maps those strings to their ids: SentencePiece
would otherwise spell them out as ordinary characters.

Used by training (sft.py, dpo.py) and serving alike, so a template problem is a `ChatTemplateError` (a
UserError, hence a ValueError): the server turns it into its HTTP 400, training counts the line as bad.
A checkpoint without a template gets BUILTIN_TEMPLATE for training (`chat_template`); the server has none.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from ..errors import UserError, read_json
from .tokenizer import Tokenizer

# Role-tagged turns, each closed by the eos token, after the BOS every pretraining document starts with.
BUILTIN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class ChatTemplateError(UserError):
    """A chat that cannot be rendered: no template, or the template refused the messages (raise_exception)."""


def _content(token) -> str | None:
    """tokenizer_config.json writes special tokens as "<s>" or as {"content": "<s>", ...}."""
    return token.get("content") if isinstance(token, dict) else token


def read_tokenizer_config(folder: str | Path | None) -> dict:
    path = Path(folder) / "tokenizer_config.json" if folder is not None else None
    if path is None or not path.exists():
        return {}
    return read_json(path)


class TextCodec:
    def __init__(self, tokenizer: Tokenizer, tokenizer_config: dict):
        self.tok = tokenizer
        cfg = tokenizer_config
        self.bos_token = _content(cfg.get("bos_token")) or "<s>"
        self.eos_token = _content(cfg.get("eos_token")) or "</s>"
        self.pad_token = _content(cfg.get("pad_token"))
        names = {self.bos_token, self.eos_token, _content(cfg.get("unk_token")) or "<unk>"}
        names |= {_content(t) for t in cfg.get("added_tokens_decoder", {}).values() if isinstance(t, dict)}
        # special token string -> id, only those the vocabulary has
        self.specials = {s: i for s in names if s and (i := tokenizer.piece_id(s)) is not None}
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.specials, key=len, reverse=True))) + ")")

    def encode(self, text: str, add_bos: bool) -> list[int]:
        ids = [self.tok.bos_id] if add_bos and self.tok.bos_id is not None else []
        for part in self._split.split(text) if self.specials else [text]:
            if part in self.specials:
                ids.append(self.specials[part])
            elif part:
                ids += self.tok.encode(part, add_bos=False)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def token_text(self, token: int) -> str:
        """A readable string for one token (logprobs): "▁" becomes a space, specials keep their names."""
        return self.tok.piece(token).replace("\u2581", " ")


class ChatTemplate:
    def __init__(self, tokenizer_config: dict, codec: TextCodec):
        template = tokenizer_config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        self.source: str | None = template
        self.codec = codec
        self._compiled = None
        if template:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._compiled = env.from_string(template)
            except TemplateError as e:
                raise UserError(f"the checkpoint's chat template does not compile: {e}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, extra: dict | None = None) -> str:
        if self._compiled is None:
            raise ChatTemplateError("this model has no chat template (tokenizer_config.json has no 'chat_template')")
        from jinja2 import TemplateError

        try:
            return self._compiled.render(**(extra or {}), messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.codec.bos_token, eos_token=self.codec.eos_token)
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template rejected these messages: {e}") from None


def _raise(message: str):
    from jinja2 import TemplateError

    raise TemplateError(message)


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path, template: str = BUILTIN_TEMPLATE) -> None:
    """Write `tokenizer` into checkpoint `folder` as load_tokenizer and chat_template read it back: its file
    (tokenizer.json or tokenizer.model) and a tokenizer_config.json naming the special tokens and the chat template."""
    import json
    import shutil

    folder = Path(folder)
    name = "tokenizer.json" if tokenizer.path.suffix == ".json" else "tokenizer.model"
    shutil.copyfile(tokenizer.path, folder / name)
    config = {"bos_token": tokenizer.piece(tokenizer.bos_id) if tokenizer.bos_id is not None else None,
              "eos_token": tokenizer.piece(tokenizer.eos_id) if tokenizer.eos_id is not None else None,
              "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def chat_template(folder: str | Path | None, tokenizer: Tokenizer) -> ChatTemplate:
    """The checkpoint's template (tokenizer_config.json), else BUILTIN_TEMPLATE (what fine-tuning trains with)."""
    cfg = read_tokenizer_config(folder)
    codec = TextCodec(tokenizer, cfg)
    if not cfg.get("chat_template"):
        cfg = {**cfg, "chat_template": BUILTIN_TEMPLATE}
    return ChatTemplate(cfg, codec)
