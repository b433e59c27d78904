"""Duplicate clusters and which document of each survives.

Documents that share a key (the exact-text hash, or one LSH band of their MinHash signature) are
candidates. Each group of equal keys becomes a star of edges to its first member: enough for
connected components, and k - 1 edges instead of k(k - 1)/2. Components come from a vectorised
union-find (`components`), checked against the plain one (`UnionFind`) in the tests.

Survivors, by source rank (0 = best):
- mode "all" (Zyda-1): one document per cluster, the best-ranked (then the earliest).
- mode "cross-source-only" (Zyda-2): only the documents of lower-ranked sources than the cluster's best
  are removed, so duplicates within one source stay.
"""

from __future__ import annotations

import numpy as np
from ..errors import UserError

MODES = ("all", "cross-source-only")


def star_edges(keys: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Edges (first member, other member) joining documents with equal keys [N]."""
    idx = np.flatnonzero(valid) if valid is not None else np.arange(len(keys))
    order = idx[np.argsort(keys[idx], kind="stable")]
    k = keys[order]
    new_group = np.r_[True, k[1:] != k[:-1]]
    first = order[np.flatnonzero(new_group)][np.cumsum(new_group) - 1]   # group's first member, per position
    dup = ~new_group
    return first[dup], order[dup]


class UnionFind:
    """Textbook union-find (path halving, union by index): the slow, obvious reference."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def labels(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components of n nodes and edges (u, v): the smallest node of each component, per node.

    Rounds of hooking and pointer jumping, all in numpy: every edge whose ends have different roots
    hangs the larger root under the smaller, then every node jumps to its root. Roots only ever point
    to smaller nodes, so there are no cycles; rounds stop when every edge lies inside one tree.
    """
    parent = np.arange(n, dtype=np.int64)
    u, v = np.asarray(u, dtype=np.int64), np.asarray(v, dtype=np.int64)
    while len(u):
        ru, rv = parent[u], parent[v]
        lo, hi = np.minimum(ru, rv), np.maximum(ru, rv)
        split = lo != hi
        if not split.any():
            break
        np.minimum.at(parent, hi[split], lo[split])
        while True:  # pointer jumping until every node points at a root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        u, v = u[split], v[split]
    return parent


def survivors(labels: np.ndarray, rank: np.ndarray, mode: str = "all") -> np.ndarray:
    """Boolean keep mask [N] given component labels and each document's source rank."""
    if mode not in MODES:
        raise UserError(f"dedup mode must be one of {MODES}, not {mode!r}")
    best = np.full(len(labels), np.iinfo(np.int64).max)
    np.minimum.at(best, labels, rank)
    if mode == "cross-source-only":
        return rank == best[labels]
    order = np.lexsort((np.arange(len(labels)), rank, labels))   # by cluster, then rank, then position
    keep = np.zeros(len(labels), dtype=bool)
    ordered = labels[order]
    keep[order[np.r_[True, ordered[1:] != ordered[:-1]]]] = True
    return keep


def removal_kinds(labels: np.ndarray, keep: np.ndarray, source: np.ndarray) -> np.ndarray:
    """For each removed document: True if its cluster keeps a document of its own source (a duplicate
    within the source), False if only other sources survive (a duplicate across sources)."""
    kept_pairs = np.unique(labels[keep] * (source.max() + 1) + source[keep])
    removed = ~keep
    return np.isin(labels[removed] * (source.max() + 1) + source[removed], kept_pairs)
