"""Exact state reuse across requests: a radix tree over token ids holding cache snapshots (`RowState`s).

A Mamba layer's state is constant-size but exists only at the exact token count it was taken at (it cannot be
truncated as a KV cache can), so snapshots sit at the token counts where the engine took them: the end of a
prompt, the end of a completion, and the branch point where a new prompt leaves a cached path (engine.py). A
lookup returns the deepest snapshot whose tokens are a prefix of the prompt. vLLM hits a hybrid model's cache
only at block boundaries (vllm#40696); here any token count is exact.

Storage follows the tree: an edge holds its tokens' KV (per hybrid layer) and, when a request scored them
(echo + logprobs), their prompt logprobs; a node holds the conv + SSM state of a snapshot. A path's KV is stored
once however many snapshots lie along it (the turns of one chat share it). A byte budget evicts the least
recently used snapshot, then the edges no snapshot needs any more. Restoring copies (HybridCache.from_row), so a
hit never changes what another row computes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.cache import RowState

TOP = 20  # top logprobs kept per scored token: the most the API hands out (protocol.py)


@dataclass
class Scores:
    """Prompt logprobs of tokens [a, b): each given the tokens before it (nan for a sequence's first token)."""

    chosen: Tensor  # [n] float32
    top_ids: Tensor  # [n, TOP] int32
    top_values: Tensor  # [n, TOP] float32

    def __getitem__(self, s: slice) -> "Scores":
        return Scores(self.chosen[s].clone(), self.top_ids[s].clone(), self.top_values[s].clone())

    @staticmethod
    def cat(parts: list["Scores"]) -> "Scores":
        return Scores(*(torch.cat([getattr(p, f) for p in parts]) for f in ("chosen", "top_ids", "top_values")))

    @property
    def nbytes(self) -> int:
        return self.chosen.nbytes + self.top_ids.nbytes + self.top_values.nbytes


@dataclass
class Hit:
    depth: int  # prompt tokens the restored state covers (0: no hit)
    state: RowState | None
    scores: Scores | None  # of tokens [0, depth), when asked for
    next_logprobs: Tensor | None  # [vocab]: the logprobs after `depth` tokens, which score token `depth`
    branch: int  # tokens the prompt shares with the deepest cached path (>= depth)


class _Node:
    def __init__(self, parent: "_Node | None", tokens: tuple[int, ...], kv: dict, scores: Scores | None):
        self.parent, self.tokens, self.kv, self.scores = parent, tokens, kv, scores  # the edge from the parent
        self.children: dict[int, _Node] = {}
        self.conv: list[Tensor] | None = None  # a snapshot's state, or None
        self.ssm: list[Tensor] | None = None
        self.next_logprobs: Tensor | None = None

    def edge_bytes(self) -> int:
        kv = sum(k.nbytes + v.nbytes for k, v in self.kv.values())
        return kv + (self.scores.nbytes if self.scores is not None else 0)

    def state_bytes(self) -> int:
        extra = self.next_logprobs.nbytes if self.next_logprobs is not None else 0
        return sum(t.nbytes for t in self.conv + self.ssm) + extra

    def split(self, at: int) -> "_Node":
        """Cut this node's edge after `at` tokens: a new stateless node takes the first part."""
        kv = {j: (k[:, :, :at].clone(), v[:, :, :at].clone()) for j, (k, v) in self.kv.items()}
        mid = _Node(self.parent, self.tokens[:at], kv, self.scores[:at] if self.scores is not None else None)
        self.parent.children[self.tokens[0]] = mid
        mid.children[self.tokens[at]] = self
        self.kv = {j: (k[:, :, at:].clone(), v[:, :, at:].clone()) for j, (k, v) in self.kv.items()}
        self.scores = self.scores[at:] if self.scores is not None else None
        self.tokens, self.parent = self.tokens[at:], mid
        return mid


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.root = _Node(None, (), {}, None)
        self.snapshots: OrderedDict[_Node, None] = OrderedDict()  # least recently used first
        self.nbytes = 0

    def lookup(self, tokens: list[int], limit: int, need_scores: bool = False) -> Hit:
        """The deepest snapshot of at most `limit` tokens that `tokens` start with (with scores all along its path
        and the logprobs after it, if `need_scores`). Its state shares the tree's conv/SSM tensors: restore it with
        HybridCache.from_row, which copies."""
        node, depth, best, best_depth, scored = self.root, 0, None, 0, True
        while depth < limit:
            child = node.children.get(tokens[depth])
            if child is None:
                break
            common = _common(child.tokens, tokens[depth:limit])
            depth += common
            if common < len(child.tokens):
                break
            node, scored = child, scored and child.scores is not None
            if node.conv is not None and (not need_scores or scored and node.next_logprobs is not None):
                best, best_depth = node, depth
        if best is None:
            return Hit(0, None, None, None, depth)
        self.snapshots.move_to_end(best)
        path = _path(best)
        kv = [edge.kv for edge in path]
        state = RowState(best.conv, best.ssm, {j: torch.cat([e[j][0] for e in kv], 2) for j in kv[0]},
                         {j: torch.cat([e[j][1] for e in kv], 2) for j in kv[0]}, best_depth)
        scores = Scores.cat([edge.scores for edge in path]) if need_scores else None
        return Hit(best_depth, state, scores, best.next_logprobs if need_scores else None, depth)

    def insert(self, tokens: list[int], state: RowState, scores: Scores | None = None,
               next_logprobs: Tensor | None = None) -> None:
        """Keep `state` (taken after `tokens`; its KV covers them all) with the scores of those tokens, if known."""
        if self.max_bytes <= 0 or not tokens:
            return
        node, depth = self.root, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                child = _Node(node, tuple(tokens[depth:]), _slice(state, depth, len(tokens)),
                              scores[depth:] if scores is not None else None)
                node.children[tokens[depth]] = child
                self.nbytes += child.edge_bytes()
                node, depth = child, len(tokens)
                break
            common = _common(child.tokens, tokens[depth:])
            if common < len(child.tokens):
                child = child.split(common)
            if child.scores is None and scores is not None:  # this request scored tokens an earlier one did not
                child.scores = scores[depth:depth + common]
                self.nbytes += child.scores.nbytes
            node, depth = child, depth + common
        if node.conv is not None:
            self.nbytes -= node.state_bytes()
        node.conv, node.ssm = state.conv, state.ssm
        if next_logprobs is not None or node.next_logprobs is None:
            node.next_logprobs = next_logprobs
        self.nbytes += node.state_bytes()
        self.snapshots[node] = None
        self.snapshots.move_to_end(node)
        while self.nbytes > self.max_bytes and self.snapshots:
            self._evict(next(iter(self.snapshots)))

    def _evict(self, node: _Node) -> None:
        """Drop a snapshot, then the edges that lead to no other snapshot."""
        del self.snapshots[node]
        self.nbytes -= node.state_bytes()
        node.conv = node.ssm = node.next_logprobs = None
        while node is not self.root and node.conv is None and not node.children:
            del node.parent.children[node.tokens[0]]
            self.nbytes -= node.edge_bytes()
            node = node.parent


def _common(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _path(node: _Node) -> list[_Node]:
    """The edges from the root down to `node`."""
    path = []
    while node.parent is not None:
        path.append(node)
        node = node.parent
    return path[::-1]


def _slice(state: RowState, a: int, b: int) -> dict:
    return {j: (state.keys[j][:, :, a:b].clone(), state.values[j][:, :, a:b].clone()) for j in state.keys}
