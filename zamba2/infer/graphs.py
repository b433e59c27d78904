"""Decode on a GPU: the model's step as one CUDA graph replay per token.

A Zamba2 decode step on a GPU is about a thousand small kernels (1.2B: 38 Mamba layers, 6 shared-block
visits); launched one by one from Python, their launch cost exceeds their work. A CUDA graph records
them once and replays them with one launch. A graph fixes every shape and address, so its step
(`static_step`) differs from Zamba2LM.forward in three ways: the token, the KV slot it writes and the
RoPE positions are read from device tensors; K/V are written with index_copy_; and attention runs over
the cache's whole capacity with its `valid` mask (empty slots weigh zero) instead of a slice to the used
length. It is plain torch code, so its equality with forward is tested on the CPU, where GraphDecoder runs
it without a graph; the captured graph is tested on a GPU (tests marked `cuda`).

A GraphDecoder owns its cache (the graph reads fixed addresses): generate prefills a cache of its own as
usual, `load`s it, then calls `step` per token, holding the decoder meanwhile (`claim`). Decoders are kept
per model for a batch size and a capacity rounded up to a power of two, at most KEEP of them (each holds a
KV cache). ZAMBA2_CUDA_GRAPHS=0 turns them off.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ..model.cache import HybridCache
from ..ops.decode import ModuleTree
from ..model.zamba2 import Context, Zamba2LM

ENABLED = os.environ.get("ZAMBA2_CUDA_GRAPHS", "1") != "0"
KEEP = 4
MIN_CAPACITY = 256


class _AtSlot:
    """The cache as the graph's layers see it: conv and SSM states as they are, K/V written at a slot held in a
    device tensor, and every slot returned (attention masks the empty ones)."""

    def __init__(self, cache: HybridCache, slot: Tensor):
        self.conv, self.ssm, self.cache, self.slot = cache.conv, cache.ssm, cache, slot

    def write_kv(self, layer: int, start, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys, values = self.cache.keys[layer], self.cache.values[layer]  # [b, kv, capacity, hd]
        keys.index_copy_(2, self.slot, k)
        values.index_copy_(2, self.slot, v)
        return keys, values


def static_step(model: Zamba2LM, tokens: Tensor, slot: Tensor, cache: HybridCache) -> Tensor:
    """tokens [b] written at KV slot `slot` (a 1-element long tensor, < cache.capacity) -> logits [b, vocab].

    Updates the cache in place as model(tokens[:, None], cache=cache) does when cache.length == slot, except
    for `length`, which stays the caller's (a graph cannot change a Python int)."""
    c = model.config
    cache.valid.index_fill_(1, slot, True)
    rope = model.rope(cache.positions[:, None])
    cache.positions.add_(1)
    x = model.embed_tokens(tokens[:, None])  # [b,1,d]
    ctx = Context(embeddings=x, chunk_size=c.chunk_size, attn_mask=cache.valid[:, None, None, :], rope=rope,
                  cache=_AtSlot(cache, slot), start=None)
    return model.body(x, ctx)[:, 0]


class GraphDecoder:
    """static_step for one batch size and KV capacity, captured as a CUDA graph on a GPU (run as is elsewhere)."""

    def __init__(self, model: Zamba2LM, batch_size: int, capacity: int):
        self.cache = model.new_cache(batch_size, capacity)
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=model.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=model.device)
        owner = weakref.ref(model)  # not the model itself: _DECODERS' entry must not keep its key alive
        self.run = lambda: static_step(owner(), self.tokens, self.slot, self.cache)
        self.graph, self.held = None, False
        if model.device.type == "cuda":
            side = torch.cuda.Stream()  # warm-up off the capturing stream, as torch.cuda.graphs asks
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # allocations, cuBLAS workspaces and kernel selection happen here
                    self.run()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.run()  # the graph's output buffer, rewritten by every replay

    def load(self, cache: HybridCache) -> None:
        """Continue from `cache` (a prefilled cache of this batch size that fits this capacity)."""
        n = cache.length
        if cache.batch_size != self.cache.batch_size or n >= self.cache.capacity:
            raise ValueError(f"a cache of {cache.batch_size} rows and {n} slots does not fit this decoder")
        mine = self.cache
        for dst, src in zip(mine.conv + mine.ssm, cache.conv + cache.ssm):
            dst.copy_(src)
        for i in mine.keys:
            mine.keys[i][:, :, :n] = cache.keys[i][:, :, :n]
            mine.values[i][:, :, :n] = cache.values[i][:, :, :n]
        mine.valid.zero_()
        mine.valid[:, :n] = cache.valid[:, :n]
        mine.positions.copy_(cache.positions)
        mine.length = n

    def step(self, tokens: Tensor) -> Tensor:
        """tokens [b] -> logits [b, vocab] (on a GPU, a buffer the next step overwrites)."""
        if self.cache.length >= self.cache.capacity:
            raise ValueError(f"the decoder's KV capacity ({self.cache.capacity}) is full")
        self.tokens.copy_(tokens)
        self.slot.fill_(self.cache.length)
        self.cache.length += 1
        if self.graph is None:
            return self.run()
        self.graph.replay()
        return self.logits


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (ModuleTree, {(b, cap): decoder})


@contextmanager
def claim(model: Zamba2LM, batch_size: int, needed: int) -> Iterator[GraphDecoder | None]:
    """A GraphDecoder for `batch_size` rows and at least `needed` KV slots, held for the block; None when not on a
    GPU, turned off, or the decoder is held already (by another generator still running: the caller decodes
    eagerly). Decoders are rebuilt when a module or parameter of the model was replaced (the graph holds their
    addresses)."""
    if not (ENABLED and model.device.type == "cuda"):
        yield None
        return
    tree, kept = _DECODERS.get(model, (None, {}))
    if tree is None or not tree.current():
        tree, kept = ModuleTree(model), {}
        _DECODERS[model] = (tree, kept)
    capacity = max(MIN_CAPACITY, 1 << (needed - 1).bit_length())
    key = (batch_size, capacity)
    if key not in kept:
        while len(kept) >= KEEP:
            kept.pop(next(iter(kept)))  # the oldest
        kept[key] = GraphDecoder(model, batch_size, capacity)
    decoder = kept[key]
    if decoder.held:
        yield None
        return
    decoder.held = True
    try:
        yield decoder
    finally:
        decoder.held = False
