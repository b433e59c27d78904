"""The serving engine: one background thread owns the model and batches every request (continuous batching).

Each loop iteration:
  1. admit queued requests into free rows: prefill each prompt alone into a 1-row HybridCache,
     sample its first token, then append the row to the running batch's cache (`HybridCache.append`
     right-aligns the KV slots; the slot mask and per-row RoPE positions let rows of any length coexist);
  2. run one decode step for all active rows at once: logits [rows, vocab];
  3. sample each row with its own temperature / top-k / top-p and its own seeded generator;
  4. hand each token to its request's `emit` callback (the server turns that into an asyncio queue put);
  5. drop finished and cancelled rows (`HybridCache.select`, then `trim` the KV slots nobody uses).

A row computes exactly what it would alone: the prefill is the same batch-1 forward `zamba2.generate`
runs, and in the batched decode step the other rows' slots are masked out of its attention.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import UserError
from ..infer.generate import decode_step, prefill, sample
from ..model.score import token_logprobs
from ..model.zamba2 import Zamba2LM


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
    cancelled: bool = False  # set by `Engine.cancel` from any thread; the row leaves at the next step


@dataclass
class _Row:
    req: Request
    generator: torch.Generator | None
    last: int = 0  # the token to feed at the next decode step
    produced: int = 0


class Engine:
    def __init__(self, model: Zamba2LM, max_batch: int = 16, max_queue: int = 256):
        if max_batch < 1 or max_queue < 1:
            raise UserError("max_batch and max_queue must be >= 1")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self._queue: deque[Request] = deque()
        self._wake = threading.Condition()
        self._rows: list[_Row] = []
        self._cache = None  # HybridCache of the active rows, in `_rows` order; None when idle
        self._running = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # batched decode steps run
        self.peak_batch = 0  # most rows decoded together

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
            self._queue.extend(requests)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def load(self) -> dict:
        return {"active": len(self._rows), "queued": len(self._queue), "max_batch": self.max_batch,
                "steps": self.steps, "peak_batch": self.peak_batch}

    # --- the engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while self._running and not self._queue and not self._rows:
                        self._wake.wait()
                    if not self._running:
                        break
                    free = self.max_batch - len(self._rows)
                    admitted = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
                for req in admitted:
                    self._guarded([req], self._admit, req)
                self._drop([r.req.cancelled for r in self._rows])
                if self._rows:
                    self._guarded([r.req for r in self._rows], self._step)
        for req in [r.req for r in self._rows] + list(self._queue):
            req.emit(Event(finish="error", error="the server is shutting down"))

    def _guarded(self, requests: list[Request], fn, *args) -> None:
        """Run one admission or step; a failure ends the requests involved, never the engine."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - reported to the requests' clients, the loop goes on
            for req in requests:
                req.emit(Event(finish="error", error=f"{type(e).__name__}: {e}"))
            involved = {id(r) for r in requests}
            self._drop([id(r.req) in involved for r in self._rows])

    def _admit(self, req: Request) -> None:
        if req.cancelled:
            return
        cache = self.model.new_cache(1, capacity=len(req.prompt) + req.max_tokens)
        ids = torch.tensor([req.prompt], device=self.model.device)  # [1, t]
        keep = 0 if req.echo_logprobs else 1
        logits = prefill(self.model, ids, cache, logits_to_keep=keep)  # [1, t or pieces, vocab]
        if req.echo_logprobs:
            req.emit(Event(prompt=self._prompt_logprobs(req, logits[0])))
        if req.max_tokens == 0:
            req.emit(Event(finish="length"))
            return
        gen = torch.Generator(device=self.model.device).manual_seed(req.seed) if req.seed is not None else None
        row = _Row(req, gen)
        if not self._deliver(row, logits[:, -1]):
            return
        if self._cache is None:
            self._cache = cache
        else:
            self._cache.append(cache)
        self._rows.append(row)

    def _step(self) -> None:
        tokens = torch.tensor([r.last for r in self._rows], device=self.model.device)  # [rows]
        logits = decode_step(self.model, tokens, self._cache)  # [rows, vocab]
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(self._rows))
        self._drop([not self._deliver(r, logits[i:i + 1]) for i, r in enumerate(self._rows)])

    def _deliver(self, row: _Row, logits: Tensor) -> bool:
        """Sample row's next token from logits [1, vocab] and emit it; False when the row is finished."""
        req = row.req
        token = int(sample(logits, req.temperature, req.top_k, req.top_p, row.generator)[0])
        row.last, row.produced = token, row.produced + 1
        event = Event(token=token)
        if req.logprobs is not None:
            lp = logits[0].float().log_softmax(-1)
            event.logprob = float(lp[token])
            event.top = _top(lp, req.logprobs)
        if token in req.eos:
            event.finish = "stop"
        elif row.produced >= req.max_tokens:
            event.finish = "length"
        req.emit(event)
        return event.finish is None

    def _drop(self, leave: list[bool]) -> None:
        if not any(leave):
            return
        keep = [i for i, gone in enumerate(leave) if not gone]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = None
            return
        self._cache.select(torch.tensor(keep, device=self.model.device))
        self._cache.trim()

    @staticmethod
    def _prompt_logprobs(req: Request, logits: Tensor) -> list:
        """logits [t, vocab] of the prompt -> per token (logprob, top k); the first token has no context."""
        targets = torch.tensor(req.prompt[1:], device=logits.device)
        chosen = token_logprobs(logits[:-1], targets).tolist()  # [t-1]: row i predicts prompt token i+1
        k = req.logprobs or 0
        if not k:
            return [None] + [(c, []) for c in chosen]
        values, ids = logits[:-1].float().log_softmax(-1).topk(k, dim=-1)  # [t-1, k]
        return [None] + [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]


def _top(lp: Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    values, ids = lp.topk(k)
    return list(zip(ids.tolist(), values.tolist()))
