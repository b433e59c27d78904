"""The pieces every decoding loop is built from (generate.stream, speculative.stream, the server's engine): the
distribution sampling draws from, a prompt prefilled in pieces, and one cached decode step, whose backend is
chosen here."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import check_sampling
from ..model.zamba2 import Zamba2LM
from ..ops import decode
from ..ops.layers import FUSED_DTYPES

# prompt tokens per prefill forward: matmuls of 512 rows run at full speed while the activations of a piece
# stay near the cache (a 2048-token prompt in 4 pieces ran 1.2x faster than in one forward on `small`;
# `python bench/compare.py` measures prefill in these pieces)
PREFILL_CHUNK = 512
GPU_PREFILL_CHUNK = 4096  # on a GPU each piece costs ~60 kernel launches per layer: fewer, longer pieces


def probabilities(logits: Tensor, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> Tensor:
    """logits [b, vocab] -> the distribution `sample` draws from at temperature > 0 [b, vocab] float32:
    temperature, then top-k, then nucleus (top-p). Speculative decoding filters target and draft alike with it."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first one always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """logits [b, vocab] -> token ids [b]. Greedy at temperature 0; otherwise top-k, then nucleus (top-p)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(probabilities(logits, temperature, top_k, top_p), 1, generator=generator)[:, 0]


def prefill(model: Zamba2LM, input_ids: Tensor, cache, attention_mask: Tensor | None = None,
            logits_to_keep: int = 1, prefill_chunk: int | None = None) -> Tensor:
    """Run a prompt [b, t] into `cache` in pieces of `prefill_chunk` tokens (default: PREFILL_CHUNK on the CPU,
    GPU_PREFILL_CHUNK on a GPU), so that the memory it needs beyond the cache is bounded by the piece. Returns
    the logits each piece keeps (`logits_to_keep`; 0 = all), concatenated: [b, t or pieces * logits_to_keep, vocab]."""
    t = input_ids.shape[1]
    prefill_chunk = prefill_chunk or (PREFILL_CHUNK if model.device.type == "cpu" else GPU_PREFILL_CHUNK)
    out = []
    for s in range(0, t, prefill_chunk):
        e = min(s + prefill_chunk, t)
        mask = attention_mask[:, :e] if attention_mask is not None else None
        out.append(model(input_ids[:, s:e], attention_mask=mask, cache=cache, logits_to_keep=logits_to_keep))
    return torch.cat(out, dim=1)


def decode_step(model: Zamba2LM, tokens: Tensor, cache) -> Tensor:
    """tokens [b] -> logits [b, vocab] of one cached decode step, the cache updated in place. The one place that
    picks how a step runs: on the CPU the model's whole step as one compiled call (ops/decode.py), else the
    model's forward (on a GPU, generate.decoder replays a CUDA graph instead, graphs.py)."""
    if model.dtype in FUSED_DTYPES and (dec := decode.compiled(model)) is not None:
        rope = model.rope(cache.positions[:, None])  # forward's positions for one unpadded token
        cos, sin = (r.view(len(tokens), -1) for r in rope) if rope is not None else (None, None)  # [b, hd]
        start = cache.extend(None, 1)
        return dec.step(tokens, cos, sin, start, cache.valid, cache.conv, cache.ssm, cache.keys, cache.values)
    return model(tokens[:, None], cache=cache, logits_to_keep=1)[:, -1]
