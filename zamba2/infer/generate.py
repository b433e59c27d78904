"""Cached generation: one prefill over the prompt, then one token per step from the cache (or several per forward
with a draft, speculative.py); the decode steps run as `decoder` chooses. Its pieces are in step.py."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ..errors import UserError, check_sampling
from ..model.cache import HybridCache
from ..model.zamba2 import Zamba2LM
from ..text.tokenizer import Tokenizer
from . import graphs, speculative
from .step import decode_step, prefill, sample


class _Eager:
    """decode_step over a cache it is handed (the decoder off a GPU); the same methods as graphs.GraphDecoder."""

    def __init__(self, model: Zamba2LM, batch_size: int):
        self.model, self.batch_size, self.cache = model, batch_size, None

    def load(self, cache) -> None:
        self.cache = cache  # stepped in place: nothing to copy

    def step(self, tokens: Tensor) -> Tensor:
        return decode_step(self.model, tokens, self.cache)

    def take(self, rows: int):
        return self.cache


@contextmanager
def decoder(model: Zamba2LM, batch_size: int, needed: int, steps: int = 2, bucket: bool = False) -> Iterator:
    """How the decode steps of `batch_size` rows needing up to `needed` KV slots run, chosen in one place for
    `stream` and the server's engine: a CUDA graph replay on a GPU (graphs.py; its own copy of the cache), else
    decode_step on the cache itself. `load(cache)` a prefilled cache, `step(tokens)` -> logits [b, vocab],
    `take(rows)` the cache the steps advanced. Fewer than 2 `steps` would not repay a graph's capture. `bucket`:
    a graph serves a batch size rounded up to a power of two (its `batch_size`; the caller pads), so that a batch
    whose size changes often reuses a few graphs."""
    if steps < 2:
        yield _Eager(model, batch_size)
        return
    rows = 1 << (batch_size - 1).bit_length() if bucket else batch_size
    with graphs.claim(model, rows, needed) as graph:
        yield graph if graph is not None else _Eager(model, batch_size)


@torch.inference_mode()
def stream(model: Zamba2LM, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, eos_token_id: int | list[int] | None = None,
           attention_mask: Tensor | None = None, seed: int | None = None,
           prefill_chunk: int | None = None, draft=None, num_speculative: int | None = None,
           cache: HybridCache | None = None) -> Iterator[Tensor]:
    """Yield the next token of every sequence ([b]) as it is produced; finished sequences yield pad.

    The prompt is prefilled in pieces of `prefill_chunk` tokens through the cache, so the memory a
    long prompt needs beyond its KV cache is bounded by the piece, not by the prompt. The decode steps run as
    `decoder` chooses (a CUDA graph replay on a GPU).

    `draft` (a smaller model with the same vocabulary, or "prompt-lookup") turns on speculative decoding
    (speculative.py, batch 1): up to `num_speculative` proposed tokens checked per forward, same outputs. With a
    carried `cache`, a `speculative.Speculator` continues the drafter from call to call (a chat's turns).

    `cache`: continue the sequences it holds (a chat's earlier turns): `input_ids` are the tokens after them, and
    every yielded token is run into it too, the last one included, so that it holds the whole conversation once the
    generator is exhausted (not when the caller stops early). Its steps are decode_step's (no CUDA graph: a graph
    decodes a copy of the cache).
    """
    cfg = model.config
    input_ids = torch.as_tensor(input_ids, device=model.device)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    b, t = input_ids.shape
    check_sampling(temperature, top_k, top_p, seed)  # before the prefill, not at the first sampled token
    if t == 0:
        raise UserError("empty prompt: give at least one token (e.g. BOS)")
    if max_new_tokens < 0 or prefill_chunk is not None and prefill_chunk < 1:
        raise UserError("max_new_tokens must be >= 0 and prefill_chunk >= 1")
    past = cache.length if cache is not None else 0
    if past + t + max_new_tokens > cfg.max_position_embeddings:
        raise UserError(f"prompt ({past + t} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                         f"length ({cfg.max_position_embeddings})")
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                       device=model.device, dtype=torch.long)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    gen = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    if draft is not None:
        if max_new_tokens:
            yield from speculative.stream(model, input_ids, max_new_tokens, draft, num_speculative, temperature, top_k,
                                          top_p, set(eos.tolist()), gen, attention_mask, prefill_chunk, cache=cache)
        return
    if num_speculative is not None:
        raise UserError("num_speculative needs a draft (a model or 'prompt-lookup')")
    carried = cache is not None
    cache = cache if carried else model.new_cache(b, capacity=t + max_new_tokens)
    done = torch.zeros(b, dtype=torch.bool, device=model.device)
    logits = prefill(model, input_ids, cache, attention_mask, prefill_chunk=prefill_chunk)[:, -1]
    with decoder(model, b, past + t + max_new_tokens, steps=0 if carried else max_new_tokens) as dec:
        dec.load(cache)
        for _ in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, gen)
            token = torch.where(done, torch.full_like(token, pad), token)
            yield token
            done |= torch.isin(token, eos)
            if bool(done.all()) and not carried:
                return
            logits = dec.step(token)
            if bool(done.all()):
                return


def stream_text(model: Zamba2LM, tokenizer: Tokenizer, input_ids: list[int], max_new_tokens: int,
                eos_token_id: int | list[int] | None = None, context: list[int] = (),
                **options) -> Iterator[tuple[int, str]]:
    """`stream` for one sequence as (token, the text it adds) pairs, the text decoded in the context of the ids
    `context` (a prompt's: leading spaces and characters split across tokens come out right; see
    Tokenizer.stream_decoder). An eos token adds no text and ends the stream. `options`: those of `stream`."""
    push = tokenizer.stream_decoder()
    for i in context:
        push(i)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    for token in stream(model, torch.tensor([input_ids]), max_new_tokens, eos_token_id=eos_token_id, **options):
        token = int(token[0])
        yield token, "" if token in eos else push(token)


def generate(model: Zamba2LM, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | list[int] | None = None,
             attention_mask: Tensor | None = None, seed: int | None = None,
             prefill_chunk: int | None = None, draft=None, num_speculative: int | None = None) -> Tensor:
    """Token ids [b, prompt + new]. Stops per sequence at EOS (pads after it) and when all have stopped.
    `draft`, `num_speculative`: speculative decoding, as in `stream`."""
    input_ids = torch.as_tensor(input_ids, device=model.device)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    new = list(stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                      attention_mask, seed, prefill_chunk, draft, num_speculative))
    return torch.cat([input_ids, torch.stack(new, 1)], dim=1) if new else input_ids
