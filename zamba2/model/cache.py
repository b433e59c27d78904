"""HybridCache: everything a Zamba2 (or Zamba1) forward needs to continue a batch of sequences.

Per layer i (every layer owns a Mamba2 mixer, or Zamba1's Mamba1):
  conv[i]  [b, conv_dim, d_conv-1]  the last raw (pre-conv) x/B/C columns (Zamba1: x only), oldest first
  ssm[i]   [b, h, p, n] float32     the SSM state (constant size, whatever the length; Zamba1's A is per channel)
Per hybrid layer i (weights are shared between hybrid layers, caches are not):
  keys[i], values[i]  [b, kv_heads, capacity, head_dim]   keys stored after RoPE
Bookkeeping:
  length        KV slots used (prompt padding included)
  valid         [b, capacity] which slots hold real tokens (False for left padding)
  positions     [b] the RoPE position the next real token of each sequence gets

Multi-token continuation is supported: a forward with a warm cache starts the chunked scan from
`ssm`, the conv from `conv`, and appends to the KV, so a prompt prefilled in pieces equals one prefill.
`snapshot` / `restore` take it back to an earlier point (speculative decoding's rejected tokens): the Mamba
states cannot be truncated like a KV cache, but they are small enough to copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import Config


@dataclass
class RowState:
    """One sequence's whole cache, compact (its valid KV slots only): what a prefix cache keeps and restores."""

    conv: list[Tensor]  # per layer [1, conv_dim, d_conv-1]
    ssm: list[Tensor]  # per layer [1, h, p, n] float32
    keys: dict[int, Tensor]  # per hybrid layer [1, kv_heads, tokens, head_dim]
    values: dict[int, Tensor]
    position: int  # tokens seen: the RoPE position of the next one

    @property
    def nbytes(self) -> int:
        tensors = [*self.conv, *self.ssm, *self.keys.values(), *self.values.values()]
        return sum(t.nbytes for t in tensors)


class HybridCache:
    def __init__(self, config: Config, batch_size: int, device="cpu", dtype=torch.float32, capacity: int = 0):
        c = config
        self.batch_size = batch_size
        self.conv = [torch.zeros(batch_size, c.conv_dim, c.mamba_d_conv - 1, device=device, dtype=dtype)
                     for _ in range(c.num_hidden_layers)]
        self.ssm = [torch.zeros(batch_size, c.n_mamba_heads, c.mamba_headdim, c.mamba_d_state, device=device,
                                dtype=torch.float32) for _ in range(c.num_hidden_layers)]
        kv_shape = (batch_size, c.num_key_value_heads, capacity, c.attention_head_dim)
        self.keys = {i: torch.zeros(kv_shape, device=device, dtype=dtype) for i in c.hybrid_layer_ids}
        self.values = {i: torch.zeros(kv_shape, device=device, dtype=dtype) for i in c.hybrid_layer_ids}
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def _grow(self, needed: int) -> None:
        """Make room for `needed` KV slots, doubling so that appends are amortised O(1)."""
        if needed <= self.capacity:
            return
        new = max(needed, 2 * self.capacity, 16)

        def grown(t: Tensor, dim: int) -> Tensor:
            shape = list(t.shape)
            shape[dim] = new - shape[dim]
            return torch.cat([t, t.new_zeros(shape)], dim=dim)

        self.keys = {i: grown(t, 2) for i, t in self.keys.items()}
        self.values = {i: grown(t, 2) for i, t in self.values.items()}
        self.valid = grown(self.valid, 1)

    def extend(self, mask: Tensor | None, n_new: int) -> int:
        """Reserve slots for `n_new` tokens (mask [b, n_new], False = padding); returns their first slot."""
        start = self.length
        self._grow(start + n_new)
        self.valid[:, start:start + n_new] = True if mask is None else mask
        self.positions += n_new if mask is None else mask.sum(1)
        self.length = start + n_new
        return start

    def write_kv(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k/v [b, kv, t, hd] at `start` and return all keys/values so far [b, kv, length, hd]."""
        K, V = self.keys[layer], self.values[layer]
        K[:, :, start:start + k.shape[2]] = k
        V[:, :, start:start + v.shape[2]] = v
        return K[:, :, :self.length], V[:, :, :self.length]

    def select(self, index: Tensor) -> None:
        """Keep (and reorder) batch rows: for beam search, or to drop finished sequences."""
        self.conv = [t.index_select(0, index) for t in self.conv]
        self.ssm = [t.index_select(0, index) for t in self.ssm]
        self.keys = {i: t.index_select(0, index) for i, t in self.keys.items()}
        self.values = {i: t.index_select(0, index) for i, t in self.values.items()}
        self.valid = self.valid.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.batch_size = len(index)

    def append(self, other: "HybridCache") -> None:
        """Add the rows of `other` to this batch (continuous batching: a request joins the running batch).

        Used KV slots are right-aligned: the cache with fewer slots gets empty (invalid) slots on its
        left, which attention masks out. RoPE positions and SSM/conv state are per row, so every row
        continues exactly as it would alone.
        """
        n = max(self.length, other.length)
        cap = max(self.capacity, other.capacity, n)

        def aligned(t: Tensor, length: int) -> Tensor:  # [b, kv, cap, hd] -> [b, kv, cap', hd], used slots end at n
            return F.pad(t[:, :, :length], (0, 0, n - length, cap - n))

        self.keys = {i: torch.cat([aligned(self.keys[i], self.length), aligned(other.keys[i], other.length)])
                     for i in self.keys}
        self.values = {i: torch.cat([aligned(self.values[i], self.length), aligned(other.values[i], other.length)])
                       for i in self.values}
        self.valid = torch.cat([F.pad(self.valid[:, :self.length], (n - self.length, cap - n)),
                                F.pad(other.valid[:, :other.length], (n - other.length, cap - n))])
        self.conv = [torch.cat(pair) for pair in zip(self.conv, other.conv)]
        self.ssm = [torch.cat(pair) for pair in zip(self.ssm, other.ssm)]
        self.positions = torch.cat([self.positions, other.positions])
        self.batch_size += other.batch_size
        self.length = n

    def trim(self) -> None:
        """Drop the leading KV slots that no row uses (left behind when long rows leave the batch)."""
        used = self.valid[:, :self.length].any(0)
        first = int(used.int().argmax()) if bool(used.any()) else self.length
        if first:
            self.keys = {i: t[:, :, first:] for i, t in self.keys.items()}
            self.values = {i: t[:, :, first:] for i, t in self.values.items()}
            self.valid = self.valid[:, first:]
            self.length -= first

    def row_state(self, i: int) -> RowState:
        """A copy of row i's state, its KV gathered from the slots it uses (they may start after left padding)."""
        used = self.valid[i, :self.length].nonzero()[:, 0]  # [tokens] slot indices
        return RowState([t[i:i + 1].clone() for t in self.conv], [t[i:i + 1].clone() for t in self.ssm],
                        {j: t[i:i + 1, :, used] for j, t in self.keys.items()},
                        {j: t[i:i + 1, :, used] for j, t in self.values.items()}, int(self.positions[i]))

    @classmethod
    def from_row(cls, config: Config, state: RowState, capacity: int = 0) -> "HybridCache":
        """A 1-row cache continuing from `state` (copied: the cache never aliases it), with room for `capacity` slots."""
        n = next(iter(state.keys.values())).shape[2] if state.keys else state.position
        conv0 = state.conv[0]
        cache = cls(config, 1, conv0.device, conv0.dtype, max(capacity, n))
        for dst, src in zip(cache.conv + cache.ssm, state.conv + state.ssm):
            dst.copy_(src)
        for j in cache.keys:
            cache.keys[j][:, :, :n] = state.keys[j]
            cache.values[j][:, :, :n] = state.values[j]
        cache.valid[:, :n] = True
        cache.positions.fill_(state.position)
        cache.length = n
        return cache

    def snapshot(self) -> "CacheSnapshot":
        """The point to come back to after a forward over tokens that may be rejected (speculative decoding):
        copies of the Mamba states (constant size, whatever the length) and the KV bookkeeping."""
        return CacheSnapshot([t.clone() for t in self.conv], [t.clone() for t in self.ssm], self.length,
                             self.positions.clone())

    def restore(self, snap: "CacheSnapshot") -> None:
        """Return to `snap`, taken on this cache: the Mamba states as they were, the KV slots written since
        dropped (marked invalid, then overwritten by the next forward). Rows must not have changed since."""
        for t, saved in zip(self.conv + self.ssm, snap.conv + snap.ssm):
            t.copy_(saved)  # in place: whoever holds these tensors (a compiled decoder, a graph) sees the change
        self.valid[:, snap.length:self.length] = False
        self.length = snap.length
        self.positions.copy_(snap.positions)

    def reset(self) -> None:
        for t in self.conv + self.ssm:
            t.zero_()
        self.valid.zero_()
        self.positions.zero_()
        self.length = 0


class CacheSnapshot:
    """What HybridCache.restore needs: conv/ssm copies per layer, the KV length and the RoPE positions."""

    def __init__(self, conv: list[Tensor], ssm: list[Tensor], length: int, positions: Tensor):
        self.conv, self.ssm, self.length, self.positions = conv, ssm, length, positions
