"""The serving engine: one background thread owns the model and batches every request (continuous batching).

Each loop iteration:
  1. admit queued requests while rows are free: restore the longest cached prefix of the prompt (prefix_cache.py)
     into a 1-row HybridCache, or start an empty one;
  2. prefill admitted prompts in pieces, at most `prefill_chunk` tokens per iteration while other rows decode, so
     a long prompt delays a running stream by one piece rather than by the whole prompt; a finished prefill
     samples its first token and joins the running batch (`HybridCache.append` right-aligns the KV slots; the
     slot mask and per-row RoPE positions let rows of any length coexist);
  3. run one decode step for all active rows at once: logits [rows, vocab], through the decoder `stream` uses
     too (generate.decoder: on a GPU a CUDA-graph replay per batch-size bucket, claimed again when rows change);
  4. sample each row with its own temperature / top-k / top-p and its own seeded generator;
  5. hand each token to its request's `emit` callback (the server turns that into an asyncio queue put);
  6. drop finished and cancelled rows (`HybridCache.select`, then `trim` the KV slots nobody uses).

With a drafter (`draft`: a model or prompt lookup, infer/speculative.py), a row alone in the batch speculates
instead of step 3: its proposals are checked in one forward on its cache, and every token accepted is delivered
in that step. Batch 1 only: in a batched step every row feeds one token, and rows would accept different numbers.
A speculating row's cache may lag its text after a rejection (the accepted tokens go first in its next check);
it catches up before another row joins. Greedy rows give the same tokens either way; sampled ones are distributed
the same (rejection sampling). Rows that ask for logprobs, seeded sampled rows (their tokens would depend on
whether they ran alone) and requests with "speculative": false always take plain steps.

Snapshots of a row's state go to the prefix cache at the end of its prompt, at the end of its completion, and
where its prompt left the deepest cached path (the branch point that the next request sharing it will hit).

A row computes what it would alone: the prefill is the batch-1 forward `zamba2.generate` runs (from a restored
state, the same forward continued), and in the batched decode step the other rows' slots are masked out of its
attention.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import UserError
from ..infer.generate import decoder
from ..infer.speculative import Cursor, Sampling, Speculator
from ..infer.step import PREFILL_CHUNK, prefill, sample
from ..model.cache import HybridCache
from ..model.zamba2 import Zamba2LM
from .metrics import Metrics
from .prefix_cache import TOP, PrefixCache, Scores

# a prompt that shares at least this many tokens with a cached path (but no snapshot that deep) gets a snapshot
# at the branch point: cheap (one state copy), and it is where the next request sharing that prefix will hit
MIN_BRANCH = 16


class QueueFull(Exception):
    """The bounded request queue has no room: the caller should answer 'overloaded' and let the client retry."""


@dataclass
class Event:
    """What the engine tells a request: a token (with logprobs if asked), the prompt's logprobs, or the end."""

    token: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # the `logprobs` most likely (token, logprob) at this step
    prompt: list[tuple[float, list[tuple[int, float]]] | None] | None = None  # per prompt token; None for the first
    finish: str | None = None  # "stop" (EOS), "length" (max_tokens), "error"
    error: str | None = None


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    emit: Callable[[Event], None]  # called on the engine thread; must not block
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos: list[int] = field(default_factory=list)  # empty: ignore EOS
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's logprob plus the top k
    echo_logprobs: bool = False  # also score the prompt tokens (echo + logprobs; lm-eval's loglikelihood)
    speculative: bool = True  # False: plain steps even alone (the server's per-request opt-out)
    cancelled: bool = False  # set by `Engine.cancel` from any thread; the row leaves at the next step
    submitted: float = 0.0  # time.perf_counter() when queued (time to first token)


@dataclass
class _Row:
    req: Request
    generator: torch.Generator | None
    last: int = 0  # the token to feed at the next decode step
    produced: list[int] = field(default_factory=list)
    unfed: int = 1  # the last produced tokens the cache does not hold: 1 (`last`), more after a rejected check
    speculator: Speculator | None = None  # made the first time the row speculates, kept while it lives
    emitted_at: float = 0.0  # time.perf_counter() of the last token (inter-token latency)


@dataclass
class _Prefill:
    """An admitted prompt on its way into its own 1-row cache."""

    req: Request
    cache: HybridCache
    done: int  # prompt tokens in the cache
    stops: list[int]  # where to pause and snapshot: a branch point, then the prompt's end
    scores: Scores | None = None  # echo + logprobs: the prompt's scores, filled as the pieces run
    last_logprobs: Tensor | None = None  # [vocab] after `done` tokens (scores the next one; echo only)
    logits: Tensor | None = None  # [1, vocab] after `done` tokens


class Engine:
    def __init__(self, model: Zamba2LM, max_batch: int = 16, max_queue: int = 256, metrics: Metrics | None = None,
                 prefix_cache_bytes: int = 0, prefill_chunk: int = PREFILL_CHUNK, draft=None,
                 num_speculative: int | None = None):
        if max_batch < 1 or max_queue < 1 or prefill_chunk < 1:
            raise UserError("max_batch, max_queue and prefill_chunk must be >= 1")
        if draft is not None:
            Speculator(model, draft, num_speculative)  # the draft and k checked now, not at a request
        elif num_speculative is not None:
            raise UserError("num_speculative needs a draft (a model or 'prompt-lookup')")
        self.draft, self.num_speculative = draft, num_speculative
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.prefill_chunk = prefill_chunk
        self.prefix = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.metrics = metrics or Metrics()
        self._queue: deque[Request] = deque()
        self._wake = threading.Condition()
        self._prefills: list[_Prefill] = []
        self._rows: list[_Row] = []
        self._cache = None  # HybridCache of the active rows, in `_rows` order; None when idle
        self._decoder = None  # how steps run while the rows stay the same (generate.decoder), holding _cache
        self._claim = ExitStack()
        self._running = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # batched decode steps run
        self.peak_batch = 0  # most rows decoded together
        self.metrics.watch(lambda: len(self._queue), lambda: len(self._rows) + len(self._prefills))

    # --- called from any thread -------------------------------------------------------------------

    def start(self) -> "Engine":
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="zamba2-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, *requests: Request) -> None:
        """Queue requests together (all or none: the n choices of one API call are admitted as a unit)."""
        with self._wake:
            if len(self._queue) + len(requests) > self.max_queue:
                raise QueueFull(f"the server is busy ({len(self._queue)} requests queued); retry later")
            now = time.perf_counter()
            for req in requests:
                req.submitted = now
            self._queue.extend(requests)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def load(self) -> dict:
        return {"active": len(self._rows), "prefilling": len(self._prefills), "queued": len(self._queue),
                "max_batch": self.max_batch, "steps": self.steps, "peak_batch": self.peak_batch}

    # --- the engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while self._running and not self._queue and not self._rows and not self._prefills:
                        self._wake.wait()
                    if not self._running:
                        break
                    free = self.max_batch - len(self._rows) - len(self._prefills)
                    admitted = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
                for req in admitted:
                    self._guarded([req], self._admit, req)
                self._prefills = [p for p in self._prefills if not p.req.cancelled]
                self._retire([r.req.cancelled for r in self._rows])
                # while rows decode, a prefill piece delays each of their next tokens: keep it short
                budget = self.prefill_chunk if self._rows else max(self.prefill_chunk, PREFILL_CHUNK)
                group = self._short_prompts(budget)
                if len(group) > 1:
                    budget -= self._prefill_together(group)
                while self._prefills and budget > 0:
                    p = self._prefills[0]
                    budget -= self._guarded([p.req], self._prefill, p, budget)
                if self._rows:
                    self._guarded([r.req for r in self._rows], self._step)
        self._release()
        for req in [r.req for r in self._rows] + [p.req for p in self._prefills] + list(self._queue):
            req.emit(Event(finish="error", error="the server is shutting down"))

    def _guarded(self, requests: list[Request], fn, *args) -> int:
        """Run one admission, prefill piece or step (returns what fn returns, 0 on failure); a failure ends the
        requests involved, never the engine."""
        try:
            return fn(*args) or 0
        except Exception as e:  # noqa: BLE001 - reported to the requests' clients, the loop goes on
            for req in requests:
                req.emit(Event(finish="error", error=f"{type(e).__name__}: {e}"))
            involved = {id(r) for r in requests}
            self._prefills = [p for p in self._prefills if id(p.req) not in involved]
            self._drop([id(r.req) in involved for r in self._rows])
            return 0

    def _admit(self, req: Request) -> None:
        """Start the prompt's prefill from the longest cached prefix (leaving at least its last token to run: its
        logits give the first token)."""
        if req.cancelled:
            return
        t = len(req.prompt)
        self.metrics.prompt_tokens.inc(t)
        capacity = t + req.max_tokens
        hit = None
        if self.prefix is not None:
            hit = self.prefix.lookup(req.prompt, t - 1, need_scores=req.echo_logprobs)
            self.metrics.cache_lookups.inc()
        if hit is not None and hit.depth:
            self.metrics.cache_hits.inc()
            p = _Prefill(req, HybridCache.from_row(self.model.config, hit.state, capacity), hit.depth, [t])
        else:
            p = _Prefill(req, self.model.new_cache(1, capacity), 0, [t])
        if hit is not None and hit.branch - p.done >= MIN_BRANCH:
            p.stops.insert(0, hit.branch)  # the next prompt that shares this much will hit here
        if req.echo_logprobs:
            k = min(TOP, self.model.config.vocab_size)
            device = self.model.device
            p.scores = Scores(torch.full((t,), float("nan"), device=device),
                              torch.zeros(t, k, dtype=torch.int32, device=device), torch.zeros(t, k, device=device))
            if p.done:
                p.scores.chosen[:p.done] = hit.scores.chosen
                p.scores.top_ids[:p.done] = hit.scores.top_ids
                p.scores.top_values[:p.done] = hit.scores.top_values
                p.last_logprobs = hit.next_logprobs
        self._prefills.append(p)

    def _prefill(self, p: _Prefill, budget: int) -> int:
        """Run the next piece of p's prompt (up to `budget` tokens, to its next stop); returns the tokens run."""
        req, s = p.req, p.done
        e = min(s + budget, p.stops[0])
        ids = torch.tensor([req.prompt[s:e]], device=self.model.device)  # [1, e-s]
        logits = prefill(self.model, ids, p.cache, logits_to_keep=0 if p.scores is not None else 1)
        self.metrics.prefilled_tokens.inc(e - s)
        if p.scores is not None:
            self._score(p, s, e, logits[0])
        p.logits, p.done = logits[:, -1], e
        if e == p.stops[0]:
            p.stops.pop(0)
            self._keep(req.prompt[:e], p.cache.row_state(0), p.scores[:e] if p.scores is not None else None,
                       p.last_logprobs)
        if not p.stops:
            self._prefills.remove(p)
            self._start(p)
        return e - s

    def _short_prompts(self, budget: int) -> list[_Prefill]:
        """Waiting prompts that one left-padded forward of at most `budget` tokens can prefill together: whole
        prompts with nothing restored, no snapshot to take on the way and no scores to keep."""
        group, longest = [], 0
        for p in self._prefills:
            if p.done or p.scores is not None or len(p.stops) > 1:
                continue
            if (len(group) + 1) * max(longest, len(p.req.prompt)) > budget:
                break
            group.append(p)
            longest = max(longest, len(p.req.prompt))
        return group

    def _prefill_together(self, group: list[_Prefill]) -> int:
        """Prefill short prompts as one left-padded batch (one forward instead of one per prompt: a forward over
        tens of tokens is mostly per-layer overhead), then give each its own 1-row cache; returns the tokens run, padding included. If the forward fails (one bad prompt), they stay
        waiting and are prefilled one by one, where a failure ends only its own request."""
        prompts = [p.req.prompt for p in group]
        t = max(map(len, prompts))
        ids = torch.tensor([[0] * (t - len(q)) + q for q in prompts], device=self.model.device)  # [k, t]
        mask = torch.tensor([[0] * (t - len(q)) + [1] * len(q) for q in prompts], device=self.model.device)
        cache = self.model.new_cache(len(group), capacity=t)
        try:
            logits = prefill(self.model, ids, cache, mask)[:, -1]  # [k, vocab]
        except Exception:  # noqa: BLE001 - retried alone, where the error reaches its own client
            return 0
        self.metrics.prefilled_tokens.inc(sum(map(len, prompts)))
        for i, p in enumerate(group):
            state = cache.row_state(i)  # its real tokens' slots only
            p.cache = HybridCache.from_row(self.model.config, state, len(p.req.prompt) + p.req.max_tokens)
            p.logits, p.done, p.stops = logits[i:i + 1], len(p.req.prompt), []
            self._keep(p.req.prompt, state)
            self._prefills.remove(p)
            self._guarded([p.req], self._start, p)
        return len(group) * t

    def _score(self, p: _Prefill, s: int, e: int, logits: Tensor) -> None:
        """Score prompt tokens up to e from the logits [e-s, vocab] of positions s..e-1 (the row before s: kept)."""
        lp = logits.float().log_softmax(-1)
        rows = lp[:-1] if p.last_logprobs is None else torch.cat([p.last_logprobs[None], lp[:-1]])
        a = e - len(rows)  # the first token these rows score (s+1 at the prompt's start, else s)
        targets = torch.tensor(p.req.prompt[a:e], device=lp.device)
        p.scores.chosen[a:e] = rows.gather(1, targets[:, None])[:, 0]
        values, ids = rows.topk(p.scores.top_ids.shape[1], dim=-1)
        p.scores.top_ids[a:e], p.scores.top_values[a:e] = ids.int(), values
        p.last_logprobs = lp[-1].clone()  # not a view: it may be kept in the prefix cache

    def _start(self, p: _Prefill) -> None:
        """The prompt is in: report its scores, sample the first token and join the running batch."""
        req = p.req
        if p.scores is not None:
            req.emit(Event(prompt=_prompt_logprobs(p.scores, req.logprobs or 0)))
        if req.max_tokens == 0:
            req.emit(Event(finish="length"))
            return
        gen = torch.Generator(device=self.model.device).manual_seed(req.seed) if req.seed is not None else None
        row = _Row(req, gen)
        if not self._deliver(row, p.logits):
            return
        self._release()
        if self._cache is None:
            self._cache = p.cache
        else:
            self._catch_up()
            self._cache.append(p.cache)
        self._rows.append(row)

    def _speculates(self, row: _Row) -> bool:
        req = row.req
        return (self.draft is not None and req.speculative and req.logprobs is None
                and (req.temperature == 0 or req.seed is None))

    def _step(self) -> None:
        n = len(self._rows)
        if n == 1 and self._speculates(self._rows[0]):
            self._speculate(self._rows[0])
            return
        if self._decoder is None:  # the rows changed: claim a decoder for them (a CUDA graph on a GPU)
            needed = self._cache.length + max(r.req.max_tokens - len(r.produced) for r in self._rows)
            self._decoder = self._claim.enter_context(decoder(self.model, n, needed, bucket=True))
            cache = self._cache
            if self._decoder.batch_size > n:  # a graph's bucket: pad with copies of row 0, their logits unused
                cache = copy.copy(cache)  # shallow: select rebinds the copy's tensors
                cache.select(torch.tensor([*range(n)] + [0] * (self._decoder.batch_size - n), device=self.model.device))
            self._decoder.load(cache)
        last = [r.last for r in self._rows]
        tokens = torch.tensor(last + last[:1] * (self._decoder.batch_size - n), device=self.model.device)
        logits = self._decoder.step(tokens)[:n]  # [rows, vocab]
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(self._rows))
        self._retire([not self._deliver(r, logits[i:i + 1]) for i, r in enumerate(self._rows)])

    def _speculate(self, row: _Row) -> None:
        """The step of a row alone: one forward checks its drafter's proposals, and the tokens it accepts, plus one
        of its own, are delivered (speculative.Speculator.step)."""
        req = row.req
        self._release()  # the check runs on the cache itself (a CUDA graph decodes a copy)
        if row.speculator is None:  # a draft model catches up on the row's text at its first proposal
            row.speculator = Speculator(self.model, self.draft, self.num_speculative,
                                        len(req.prompt) + req.max_tokens + 1, self.prefill_chunk)
        text = req.prompt + row.produced
        target = Cursor(self.model, self._cache, len(text) - row.unfed, self.prefill_chunk)
        sampling = Sampling(req.temperature, req.top_k, req.top_p, row.generator)
        new, proposed = row.speculator.step(target, text, req.max_tokens - len(row.produced) - 1, sampling)
        self.steps += 1
        self.peak_batch = max(self.peak_batch, 1)
        self.metrics.speculative_steps.inc()
        self.metrics.speculative_proposed.inc(proposed)
        self.metrics.speculative_accepted.inc(len(new) - 1)
        running = True
        for token in new:
            running = self._emit(row, token)
            if not running:  # EOS or max_tokens inside the accepted proposals: the rest is not delivered
                break
        row.unfed = len(req.prompt) + len(row.produced) - target.seen  # < 1: the cache ran past the row's end
        if not running:
            self._retire([True])

    def _catch_up(self) -> None:
        """Before a row joins: a speculating row's cache runs the tokens it lags by (all but `last`), so that every
        row feeds one token per batched step. Only a row alone speculates, so it is the only row."""
        if len(self._rows) == 1 and (row := self._rows[0]).unfed > 1:
            text = row.req.prompt + row.produced
            Cursor(self.model, self._cache, len(text) - row.unfed, self.prefill_chunk).feed(text[-row.unfed:-1], 1)
            row.unfed = 1

    def _deliver(self, row: _Row, logits: Tensor) -> bool:
        """Sample row's next token from logits [1, vocab] and emit it; False when the row is finished."""
        req = row.req
        return self._emit(row, int(sample(logits, req.temperature, req.top_k, req.top_p, row.generator)[0]), logits)

    def _emit(self, row: _Row, token: int, logits: Tensor | None = None) -> bool:
        """Hand row's next token to its request, with its logprobs (from logits [1, vocab]) if asked; False when
        the row is finished."""
        req = row.req
        now = time.perf_counter()
        (self.metrics.itl if row.produced else self.metrics.ttft).observe(now - (row.emitted_at or req.submitted))
        self.metrics.generated_tokens.inc()
        row.emitted_at, row.last = now, token
        row.produced.append(token)
        event = Event(token=token)
        if req.logprobs is not None:
            lp = logits[0].float().log_softmax(-1)
            event.logprob = float(lp[token])
            event.top = _top(lp, req.logprobs)
        if token in req.eos:
            event.finish = "stop"
        elif len(row.produced) >= req.max_tokens:
            event.finish = "length"
        req.emit(event)
        return event.finish is None

    def _retire(self, leave: list[bool]) -> None:
        """Snapshot the rows that finished or were cancelled (their state covers every token but the `unfed` last;
        none when a check ran it past the row's end), then drop them."""
        if any(leave):
            self._release()
        for i, gone in enumerate(leave):
            row = self._rows[i]
            if gone and row.unfed >= 1:
                self._keep(row.req.prompt + row.produced[:len(row.produced) - row.unfed], self._cache.row_state(i))
        self._drop(leave)

    def _keep(self, tokens: list[int], state, scores: Scores | None = None, next_logprobs: Tensor | None = None):
        if self.prefix is None:
            return
        self.prefix.insert(tokens, state, scores, next_logprobs)
        self.metrics.cache_bytes.set(self.prefix.nbytes)
        self.metrics.cache_snapshots.set(len(self.prefix.snapshots))

    def _release(self) -> None:
        """Take the rows' cache back from the decoder (before the rows change) and let the decoder go."""
        if self._decoder is not None:
            self._cache = self._decoder.take(len(self._rows))
            self._decoder = None
            self._claim.close()

    def _drop(self, leave: list[bool]) -> None:
        if not any(leave):
            return
        self._release()
        keep = [i for i, gone in enumerate(leave) if not gone]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = None
            return
        self._cache.select(torch.tensor(keep, device=self.model.device))
        self._cache.trim()


def _prompt_logprobs(scores: Scores, k: int) -> list:
    """Per prompt token (logprob, top k); None for the first, which has no context."""
    chosen = scores.chosen.tolist()
    if not k:
        return [None] + [(c, []) for c in chosen[1:]]
    ids, values = scores.top_ids[:, :k].tolist(), scores.top_values[:, :k].tolist()
    return [None] + [(c, list(zip(i, v))) for c, i, v in zip(chosen[1:], ids[1:], values[1:])]


def _top(lp: Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    values, ids = lp.topk(k)
    return list(zip(ids.tolist(), values.tolist()))
