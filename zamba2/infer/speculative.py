"""Speculative decoding (Leviathan et al. 2023, Chen et al. 2023) for the hybrid: a drafter proposes k tokens, the
model checks them all in one forward and keeps the longest prefix it agrees with, plus one token of its own.

At batch 1 a decode step reads every weight once; a forward over k+1 tokens reads them once too, so the tokens it
accepts come nearly free. A Transformer drops rejected tokens by truncating its KV cache; a Mamba layer cannot, as
the forward keeps only the state after its last token. So the cache is snapshotted before the check (its Mamba
states have a constant size, HybridCache.snapshot) and restored after a rejection; the accepted tokens are then
not re-run at once but go first in the next check's forward (a cached forward continues over any number of tokens
exactly), so a rejection costs a few more rows in the next forward instead of a forward of its own.

The output is the model's own. Greedy: a proposal is kept only when it is the model's argmax, so the tokens equal
plain decoding (up to near-ties in float: a multi-token forward rounds differently from a decode step). Sampling:
rejection sampling (keep proposal d with probability min(1, p(d)/q(d)), else draw from norm(max(0, p - q))), so
every token is distributed as the model's, with temperature, top-k and top-p applied to p and q alike.

Drafters: a smaller model with the same vocabulary (its own cache, rolled back alike), or prompt lookup: the tokens
that followed the latest earlier occurrence of the text's last n tokens (no second model; q is a point mass).
Batch 1 only: rows would accept different numbers of tokens, and the cache's rows share one KV length.

A Speculator holds what carries over from one call to the next that continues the same sequence: the drafter,
the schedule and the text so far. `zamba2 chat --draft` keeps one across turns, as it keeps the cache; the
server's engine keeps one per request and speculates while that request runs alone (serve/engine.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from ..model.cache import HybridCache
from ..model.zamba2 import Zamba2LM
from .step import decode_step, prefill, probabilities

PROMPT_LOOKUP = "prompt-lookup"
NUM_SPECULATIVE = 4  # the largest k when adaptive (num_speculative None): the schedule picks k in 0..this per step
MAX_NGRAM = 3  # prompt lookup matches the last 3 tokens, else 2, else 1

MAX_UNFED = 8  # a check re-runs the tokens accepted since the last full acceptance: beyond this, run them first

DECAY = 0.8  # the acceptance rate and the step times are running averages over about 1 / (1 - DECAY) steps
PROBE_EVERY = 16  # every this many steps the other mode once: plain-step time and acceptance go stale otherwise


class Cursor:
    """A model, a cache of one sequence and how many tokens of the sequence's text the cache holds."""

    def __init__(self, model: Zamba2LM, cache: HybridCache, seen: int, prefill_chunk: int | None):
        self.model, self.cache, self.seen, self.prefill_chunk = model, cache, seen, prefill_chunk

    def feed(self, tokens: list[int], keep: int) -> Tensor:
        """Run `tokens` into the cache -> the logits at the last `keep` of them [keep, vocab]."""
        ids = torch.tensor([tokens], device=self.model.device)
        if len(tokens) == 1:  # the plain decode step (compiled on the CPU), so a step without proposals costs one
            logits = decode_step(self.model, ids[0], self.cache)
        else:
            logits = prefill(self.model, ids, self.cache, logits_to_keep=keep, prefill_chunk=self.prefill_chunk)[0]
        self.seen += len(tokens)
        return logits[-keep:]

    def mark(self) -> tuple:
        return self.seen, self.cache.snapshot()

    def rewind(self, mark: tuple) -> None:
        self.seen, snap = mark
        self.cache.restore(snap)


class PromptLookup:
    """Proposes what followed the latest earlier occurrence of the text's last MAX_NGRAM (else fewer) tokens: strong
    where the output repeats its input (summaries, edits, code, retrieved passages), free where it does not."""

    def __init__(self):
        self.latest = [{} for _ in range(MAX_NGRAM)]  # [n-1]: n-gram -> the position its latest occurrence ends at
        self.indexed = 0  # n-grams ending before this position are in `latest`

    def propose(self, text: list[int], k: int, pick) -> tuple[list[int], None]:
        last = len(text) - 1
        for end in range(self.indexed, last):  # not the last position itself: its match must be earlier
            for n in range(1, min(MAX_NGRAM, end + 1) + 1):
                self.latest[n - 1][tuple(text[end - n + 1:end + 1])] = end
        self.indexed = max(self.indexed, last)
        for n in range(min(MAX_NGRAM, last + 1), 0, -1):
            if (end := self.latest[n - 1].get(tuple(text[last - n + 1:]))) is not None:
                return text[end + 1:end + 1 + k], None
        return [], None

    def rollback(self, text: list[int]) -> None:
        pass  # the index holds only accepted text


class DraftModel:
    """A smaller model with the target's vocabulary proposes by decoding; it keeps its own cache, with a snapshot
    before each proposal it feeds, so that a rejection rolls it back to the accepted prefix without a re-run."""

    def __init__(self, model: Zamba2LM, capacity: int, prefill_chunk: int | None):
        self.cursor = Cursor(model, model.new_cache(1, capacity), 0, prefill_chunk)
        self.held: list[int] = []  # the tokens the cache holds
        self.marks: dict[int, tuple] = {}

    def propose(self, text: list[int], k: int, pick) -> tuple[list[int], Tensor | None]:
        cur, pending = self.cursor, text[self.cursor.seen:]
        # after a check the draft lacks one or two tokens: decode steps, as a small model's eager multi-token
        # forward costs several of its compiled steps (bench/speculative.py); after plain steps, one forward
        for piece in [[t] for t in pending] if len(pending) <= 2 else [pending]:
            logits = cur.feed(piece, 1)
        drafts, qs, self.marks = [], [], {}
        for i in range(k):
            token, q = pick(logits)
            drafts.append(token)
            qs.append(q)
            if i < k - 1:
                self.marks[cur.seen] = cur.mark()
                logits = cur.feed([token], 1)
        self.held = text + drafts[:-1]
        return drafts, torch.cat(qs) if qs and qs[0] is not None else None

    def rollback(self, text: list[int]) -> None:
        """Keep the longest prefix of what the cache holds that the text (now with accepted tokens) starts with."""
        agree = next((i for i, (a, b) in enumerate(zip(self.held, text)) if a != b), min(len(self.held), len(text)))
        if agree < self.cursor.seen:
            self.cursor.rewind(self.marks[agree])


class Schedule:
    """How many tokens to propose. Fixed (`adaptive` False): k_max every step, so a seeded run is reproducible.
    Adaptive: the k in 0..k_max with the most expected tokens per second, from a running acceptance rate a (k
    proposals yield (1 - a^(k+1)) / (1 - a) tokens) and the measured seconds of a plain step, a check and a draft
    token; 0 (plain decoding) when no k beats plain steps; every PROBE_EVERY steps the other mode, to re-time it.
    As the choice depends on timings, a seeded sample is then reproducible in distribution, not token for token."""

    def __init__(self, k_max: int, adaptive: bool):
        self.k_max, self.adaptive = k_max, adaptive
        self.accepted, self.tried = 1.6, 2.0  # prior: rate 0.8, worth about two steps
        self.seconds: dict[str, float] = {}  # running averages: "plain" step, "check" forward, "draft" token
        self.steps = 0

    def next(self, room: int) -> int:
        """k for the next step, at most `room`."""
        if not self.adaptive or "check" not in self.seconds:
            k = self.k_max if self.adaptive is False or "plain" in self.seconds else 0  # measure a plain step first
            return min(k, room)
        a, t = min(self.accepted / self.tried, 0.999), self.seconds

        def rate(k: int) -> float:  # tokens per second
            return 1 / t["plain"] if k == 0 else (1 - a ** (k + 1)) / (1 - a) / (t["check"] + k * t.get("draft", 0))

        k = max(range(self.k_max + 1), key=rate)
        self.steps += 1
        if self.steps % PROBE_EVERY == 0:  # a probe: proposals while plain steps pay, a plain step to re-time it
            k = 0 if k else 1
        return min(k, room)

    def update(self, proposed: int, accepted: int) -> None:
        """Each proposal up to the first rejection is one trial."""
        self.accepted = DECAY * self.accepted + accepted
        self.tried = DECAY * self.tried + accepted + (accepted < proposed)

    def timed(self, what: str, seconds: float) -> None:
        old = self.seconds.get(what)
        self.seconds[what] = seconds if old is None else DECAY * old + (1 - DECAY) * seconds


def check(logits: Tensor, drafts: list[int], q: Tensor | None, temperature: float, top_k: int | None,
          top_p: float | None, generator: torch.Generator | None) -> tuple[int, int]:
    """The model's logits [k+1, vocab] at the positions before each proposal and after the last, the k proposals
    and the drafter's distributions q [k, vocab] (None: point masses) -> (proposals accepted, the model's token)."""
    if temperature == 0:
        best = logits.argmax(-1).tolist()
        j = next((i for i, d in enumerate(drafts) if d != best[i]), len(drafts))
        return j, best[j]
    p = probabilities(logits, temperature, top_k, top_p)  # [k+1, vocab]
    for i, d in enumerate(drafts):
        qd = float(q[i, d]) if q is not None else 1.0
        if float(torch.rand((), generator=generator, device=p.device)) * qd < float(p[i, d]):
            continue  # kept with probability min(1, p/q)
        rest = (p[i] - q[i]).clamp(min=0) if q is not None else p[i].index_fill(0, torch.tensor(d, device=p.device), 0)
        if not float(rest.sum()) > 0:  # p == q: a rejection has probability 0, reached only through rounding
            rest = p[i]
        return i, int(torch.multinomial(rest, 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))


def drafter_for(model: Zamba2LM, draft, capacity: int, prefill_chunk: int | None):
    """The drafter for `draft`: a model or PROMPT_LOOKUP."""
    if isinstance(draft, str):
        if draft != PROMPT_LOOKUP:
            raise UserError(f"draft = {draft!r}; expected a model or {PROMPT_LOOKUP!r}")
        return PromptLookup()
    if not isinstance(draft, Zamba2LM):
        raise UserError(f"draft must be a zamba2 model or {PROMPT_LOOKUP!r}, not {type(draft).__name__}")
    if draft.config.vocab_size != model.config.vocab_size:
        raise UserError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the model's "
                        f"({model.config.vocab_size}): a draft must share the model's tokenizer")
    if draft.device != model.device:
        raise UserError(f"the draft model is on {draft.device}, the model on {model.device}")
    return DraftModel(draft, capacity, prefill_chunk)


@dataclass
class Sampling:
    """How the model's tokens and the drafter's proposals are drawn (temperature 0: greedy)."""

    temperature: float
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def pick(self, logits: Tensor) -> tuple[int, Tensor | None]:
        """A drafter's proposal from its logits [1, vocab], and the distribution it was drawn from (None: greedy)."""
        if self.temperature == 0:
            return int(logits.argmax()), None
        q = probabilities(logits, self.temperature, self.top_k, self.top_p)
        return int(torch.multinomial(q, 1, generator=self.generator)), q

    def check(self, logits: Tensor, drafts: list[int], q: Tensor | None) -> tuple[int, int]:
        return check(logits, drafts, q, self.temperature, self.top_k, self.top_p, self.generator)


class Speculator:
    """What speculative decoding keeps of one sequence from step to step, and from one call to the next that
    continues it (a chat's turns, a server request's spells alone in the batch): the drafter (a draft model's own
    cache, prompt lookup's index), the schedule of k, counts, and `text`, the sequence `stream` has run so far
    (the tokens the carried cache holds once a stream is exhausted)."""

    def __init__(self, model: Zamba2LM, draft, num_speculative: int | None, capacity: int = 0,
                 prefill_chunk: int | None = None, text: list[int] = ()):
        k_max = NUM_SPECULATIVE if num_speculative is None else num_speculative
        if not isinstance(k_max, int) or isinstance(k_max, bool) or k_max < 0:
            raise UserError(f"num_speculative = {k_max!r}; expected an integer >= 0 (0: plain decoding)")
        self.drafter = drafter_for(model, draft, capacity, prefill_chunk)
        self.schedule = Schedule(k_max, adaptive=num_speculative is None)
        self.stats = dict(steps=0, proposed=0, accepted=0)
        self.text = list(text)

    def step(self, target: Cursor, text: list[int], room: int, sampling: Sampling) -> tuple[list[int], int]:
        """One forward of the model after `text` (its cache, `target`, holds text[:target.seen]; the rest goes
        first in this forward) -> (the new tokens: the proposals it accepted, then one of its own; at most
        room + 1 of them, the number of proposals). After a rejection the cache is back before this forward."""
        k = self.schedule.next(room)
        t0 = time.perf_counter()
        drafts, q = self.drafter.propose(text, k, sampling.pick) if k else ([], None)
        t1 = time.perf_counter()
        pending = text[target.seen:]
        if drafts and len(pending) > MAX_UNFED:  # a run of rejections: else every check re-runs the same tokens
            target.feed(pending[:-1], 1)
            pending = pending[-1:]
        mark = target.mark() if drafts else None
        logits = target.feed(pending + drafts, len(drafts) + 1)
        j, token = sampling.check(logits, drafts, q)
        if j < len(drafts):  # back to before this forward; what it got right goes first in the next one
            target.rewind(mark)
        t2 = time.perf_counter()
        if drafts:
            self.schedule.update(len(drafts), j)
            self.schedule.timed("check", t2 - t1)
            if isinstance(self.drafter, DraftModel):
                self.schedule.timed("draft", (t1 - t0) / len(drafts))
        elif len(pending) == 1:
            self.schedule.timed("plain", t2 - t1)
        self.stats["steps"] += 1
        self.stats["proposed"] += len(drafts)
        self.stats["accepted"] += j
        new = drafts[:j] + [token]
        self.drafter.rollback(text + new)
        return new, len(drafts)


def stream(model: Zamba2LM, input_ids: Tensor, max_new_tokens: int, draft, num_speculative: int | None,
           temperature: float, top_k: int | None, top_p: float | None, eos: set[int], generator: torch.Generator | None,
           attention_mask: Tensor | None, prefill_chunk: int | None, stats: dict | None = None,
           cache: HybridCache | None = None) -> Iterator[Tensor]:
    """generate.stream's loop with a drafter (its arguments checked there): yields each new token as a [1] tensor,
    several per forward when proposals are accepted; stops after an EOS token. `stats` (bench/speculative.py)
    counts the model's forwards after the prompt ("steps"), the tokens "proposed" and those "accepted".

    `draft`: a model, PROMPT_LOOKUP, or a Speculator that continues what `cache` holds (its `text`), as a chat's
    turns do; `cache`, as in generate.stream: it holds the whole sequence once the generator is exhausted."""
    if input_ids.shape[0] != 1:
        raise UserError(f"speculative decoding (draft=...) runs one sequence at a time; got a batch of "
                        f"{input_ids.shape[0]} (generate them one by one, or without a draft)")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise UserError("speculative decoding takes an unpadded prompt: attention_mask must be all ones")
    carried = cache is not None
    past = cache.length if carried else 0
    if isinstance(draft, Speculator):
        if num_speculative is not None:
            raise UserError("num_speculative is the Speculator's own (set it where the Speculator is made)")
        speculator = draft
    else:
        speculator = Speculator(model, draft, num_speculative, past + input_ids.shape[1] + max_new_tokens + 1,
                                prefill_chunk)
    if len(speculator.text) != past:
        raise UserError(f"the drafter has run {len(speculator.text)} tokens but the cache holds {past}: a carried "
                        "cache continues with the speculative.Speculator that ran it")
    text = speculator.text = speculator.text + input_ids[0].tolist()
    if not carried:
        cache = model.new_cache(1, len(text) + max_new_tokens + speculator.schedule.k_max + 1)
    target = Cursor(model, cache, past, prefill_chunk)
    sampling = Sampling(temperature, top_k, top_p, generator)
    if stats is not None:  # this call's counts, from here on
        stats.update(steps=0, proposed=0, accepted=0)
        speculator.stats = stats

    logits = target.feed(text[target.seen:], 1)
    new = [sampling.check(logits, [], None)[1]]
    produced = 0
    while True:
        for token in new:
            yield torch.tensor([token], device=model.device)
            text.append(token)
            produced += 1
            if token in eos or produced == max_new_tokens:
                speculator.drafter.rollback(text)  # not past an EOS inside the accepted proposals
                if carried:  # the cache holds the whole sequence, as generate.stream's does
                    target.feed(text[target.seen:], 1)
                return
        new, _ = speculator.step(target, text, max_new_tokens - produced - 1, sampling)
