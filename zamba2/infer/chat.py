"""`zamba2 chat`: a conversation whose cache is carried from turn to turn, so a turn prefills only its own new tokens
(the template text around the user's message), never the history again. The Mamba state is constant-size, so
a turn costs the same at turn 30 as at turn 1 but for attention over the longer KV cache (bench/chat.py).

The cache holds the conversation as the model saw it: each turn's prompt text as the template renders it, and the
reply tokens as they were sampled (through eos). Re-encoding a reply's text could give other tokens than those
sampled (a word the model spelt in two pieces comes back as one), so the conversation is compared as text: when
the template renders the history exactly as before (every template that only appends does), the new text after it
is encoded and prefilled; otherwise (a template that rewrites earlier turns) the whole conversation is prefilled
again, counted in `reprefills`. Either way the result equals prefilling the conversation's tokens at once.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..errors import UserError, check_range, check_sampling
from ..model.zamba2 import Zamba2LM
from ..text.chat import ChatTemplate
from ..text.tokenizer import Tokenizer
from .generate import stream_text
from .speculative import Speculator

COMMANDS = "/reset, /system TEXT, /save FILE, /exit"


class ContextFull(UserError):
    """A turn that does not fit in what is left of the context."""


class ChatSession:
    def __init__(self, model: Zamba2LM, tokenizer: Tokenizer, template: ChatTemplate, system: str | None = None,
                 max_new_tokens: int = 512, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, max_context: int | None = None,
                 draft=None, num_speculative: int | None = None):
        """`draft`, `num_speculative`: speculative decoding as in generate.stream (a draft model or "prompt-lookup");
        the drafter carries the conversation from turn to turn as the cache does."""
        check_sampling(temperature, top_k, top_p, seed)
        check_range("chat", "max_new_tokens", max_new_tokens, 1)
        if max_context is not None:
            check_range("chat", "max_context", max_context, 1)
        self.model, self.tok, self.template = model, tokenizer, template
        self.max_new_tokens = max_new_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.seed = seed
        limit = model.config.max_position_embeddings
        self.context = min(max_context, limit) if max_context else limit
        self.eos = model.config.eos_token_ids or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        self.system = system
        self.draft, self.num_speculative = draft, num_speculative
        self.reprefills = 0
        self.reset()

    def reset(self) -> None:
        """Start over (the system prompt stays)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = self.model.new_cache(1)
        self.ids: list[int] = []  # the tokens in the cache
        self.text = ""  # the conversation text they spell, as the template rendered it
        self.reply: list[int] = []  # the last reply's tokens (its eos included)
        self.stop = None  # why the last reply ended: "eos", "length" (max_new_tokens) or "context"
        self.speculator = self._speculator([])

    def _speculator(self, text: list[int]) -> Speculator | None:
        """The drafter state for a conversation whose cache holds `text` (None: no draft). A draft model catches
        up on `text` in one forward at its first proposal; prompt lookup indexes it."""
        if self.draft is None:
            return None
        return Speculator(self.model, self.draft, self.num_speculative, text=text)

    def set_system(self, text: str | None) -> None:
        """A new system prompt: it comes first in the conversation, so the conversation starts over."""
        self.system = text or None
        self.reset()

    def say(self, content: str) -> Iterator[str]:
        """The reply to user message `content`, streamed as text pieces; the turn is part of the conversation once
        the generator is exhausted. A turn stopped before (Ctrl-C) is dropped, the cache back where it was; one
        whose prompt does not fit raises ContextFull, the conversation kept."""
        messages = self.messages + [{"role": "user", "content": content}]
        text = self.template.render(messages, add_generation_prompt=True)
        carried = text.startswith(self.text)
        new = self.template.codec.encode(text[len(self.text):] if carried else text, add_bos=False)
        past = len(self.ids) if carried else 0
        room = self.context - past - len(new)
        if room < 1:
            raise ContextFull(f"the conversation would fill the context ({self.context} tokens); "
                              "/reset starts a new one")
        kept, point = self.cache, self.cache.snapshot()
        cache = self.cache if carried else self.model.new_cache(1)  # else the template rewrote the history
        speculator = self.speculator if carried else self._speculator([])
        reply: list[int] = []
        seed = None if self.seed is None else self.seed + len(self.messages)  # a fresh draw each turn, reproducible
        finished = False
        try:
            for token, piece in stream_text(self.model, self.tok, new, min(self.max_new_tokens, room), self.eos,
                                            cache=cache, seed=seed, draft=speculator, **self.sampling):
                reply.append(token)
                yield piece
            finished = True
        finally:
            if not finished:
                with torch.inference_mode():  # the cache's tensors were made by stream, in inference mode
                    kept.restore(point)
                if speculator is not None and carried:  # it has run the dropped reply: start it again on the rest
                    self.speculator = self._speculator(self.ids)
        self.cache, self.speculator = cache, speculator
        self.reprefills += not carried
        if not carried:
            self.ids = []
        ended = bool(reply) and reply[-1] in self.eos
        self.reply = reply
        self.stop = "eos" if ended else "length" if len(reply) == self.max_new_tokens else "context"
        answer = self.tok.decode(reply[:-1] if ended else reply)
        self.ids += new + reply
        self.text = text + answer + (self.tok.piece(reply[-1]) if ended else "")
        self.messages = messages + [{"role": "assistant", "content": answer}]

    def save(self, path: str | Path) -> None:
        """The conversation as JSON: {"messages": [...]}, a line of `zamba2 finetune`'s data."""
        Path(path).write_text(json.dumps({"messages": self.messages}, ensure_ascii=False, indent=2) + "\n",
                              encoding="utf-8")


def chat(session: ChatSession, lines: Iterable[str], out=sys.stdout, interactive: bool = False) -> None:
    """The conversation loop: each line is a user turn or a command (COMMANDS); replies stream to `out`.
    A command's or a turn's error is one line, and the conversation goes on."""
    if interactive:
        print(f"chatting with a {session.context}-token context; commands: {COMMANDS}", file=out)
    for line in lines:
        line = line.rstrip("\n")
        command, _, argument = line.partition(" ")
        try:
            if command == "/exit":
                return
            if command == "/reset":
                session.reset()
                print("(conversation reset)", file=out)
            elif command == "/system":
                session.set_system(argument.strip())
                print("(system prompt set; conversation reset)", file=out)
            elif command == "/save":
                if not argument.strip():
                    raise UserError("/save needs a file name")
                session.save(argument.strip())
                print(f"(saved to {argument.strip()})", file=out)
            elif command.startswith("/"):
                raise UserError(f"unknown command {command}; commands: {COMMANDS}")
            elif line.strip():
                try:
                    for piece in session.say(line):
                        out.write(piece)
                        out.flush()
                except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat
                    if not interactive:
                        raise
                    out.write(" (stopped; this turn is dropped)")
                out.write("\n")
                if session.stop == "context":
                    print(f"(the context is full: {session.context} tokens; /reset starts a new conversation)",
                          file=out)
        except (UserError, OSError) as e:  # bad input or an unwritable /save file: say so and go on
            print(f"error: {e}", file=out if interactive else sys.stderr)
        out.flush()


def terminal_lines(prompt: str = ">>> ") -> Iterator[str]:
    """Lines typed at a terminal, with readline's editing and history; ends at EOF (Ctrl-D)."""
    import readline  # noqa: F401  (importing it gives input() line editing and history)

    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return
