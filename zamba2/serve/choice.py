"""One choice of a response: the engine's events for it turned into text.

Incremental detokenization (a few prompt tokens first, so the first word's leading space decodes right),
stop strings (the text is cut where one begins, and what could still become one is held back from a
stream), and the logprobs not yet sent.
"""

from __future__ import annotations

from .engine import Event
from .engine import Request as EngineRequest
from ..text.chat import TextCodec


class Choice:
    """One choice of a response: the engine request and the text its events have produced so far."""

    def __init__(self, index: int, prompt: list[int], codec: TextCodec, stops: list[str]):
        self.index, self.prompt, self.codec, self.stops = index, prompt, codec, stops
        self.push = codec.tok.stream_decoder()
        for t in prompt[-8:]:  # a little prompt context, so the first word's leading space decodes right
            self.push(t)
        self.text, self.sent = "", 0
        self.tokens: list[int] = []
        self.logprobs: list[tuple[int, float, list]] = []  # (token, logprob, top) per generated token
        self.logprobs_sent = 0
        self.offset = 0  # text_offset of the next token's logprobs entry (streaming)
        self.prompt_logprobs = None
        self.finish: str | None = None
        self.error: str | None = None
        self.request: EngineRequest | None = None

    def feed(self, event: Event) -> None:
        if self.finish is not None:  # finished by a stop string; the engine's late events do not count
            return
        if event.prompt is not None:
            self.prompt_logprobs = event.prompt
        if event.token is not None:
            self.tokens.append(event.token)
            if event.logprob is not None:
                self.logprobs.append((event.token, event.logprob, event.top))
            if event.finish != "stop":  # EOS adds no text
                seen = len(self.text)
                self.text += self.push(event.token)
                if self._cut_at_stop(seen):
                    return
        if event.finish:
            self.finish, self.error = event.finish, event.error

    def _cut_at_stop(self, seen: int) -> bool:
        for s in self.stops:
            at = self.text.find(s, max(0, seen - len(s) + 1))
            if at >= 0:
                self.text, self.finish = self.text[:at], "stop"
                return True
        return False

    def new_text(self) -> str:
        """Text not yet streamed. While running, hold back what could still become a stop string."""
        hold = 0 if self.finish else max((len(s) - 1 for s in self.stops), default=0)
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:end], end
        return out

    def new_logprobs(self) -> list[tuple[int, float, list]]:
        out, self.logprobs_sent = self.logprobs[self.logprobs_sent:], len(self.logprobs)
        return out
