"""MinHash signatures and LSH band keys, vectorised with numpy.

Shingles are word n-grams (Zyda-1: 13) or character n-grams (Zyda-2 / NeMo Curator: 25). Instead of
hashing every shingle string in Python (what datasketch's `update_batch` does, one sha1 call each), a
document becomes an array of code points and every shingle hash comes from one prefix sum:

    H[i] = sum_{j<i} x_j * B^j  (mod 2^64)      hash(x[s:e]) = (H[e] - H[s]) * B^-s  (mod 2^64)

B is odd, so B^-1 exists mod 2^64 and equal substrings hash equally wherever they start. Word n-grams
apply the same trick twice: code points -> word hashes -> n-gram hashes. A murmur finaliser (fmix64)
breaks the linearity before a hash is used again.

Permutation i is Dietzfelbinger's multiply-add-shift h_i(x) = ((a_i x + b_i) mod 2^64) >> 32 on the
32-bit shingle hash x, a 2-universal family. (datasketch 2.0's default "affine32" scheme is
(a x + b) mod 2^32 after a murmur mix; its "legacy" one (a x + b) mod (2^61 - 1).) The shift is
monotone, so the min is taken on the 64-bit values and shifted once per document.

Shapes: S shingles in a batch, P permutations, D documents, R rows per band, K bands.
"""

from __future__ import annotations

import string
import unicodedata
from dataclasses import dataclass

import numpy as np
from ..errors import UserError

M64 = np.uint64
EMPTY = np.uint32(0xFFFFFFFF)  # signature of a document with no shingles
_PUNCT = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class MinHashParams:
    """Shingling and banding. `zyda1` and `zyda2` are the presets of the Zyda papers."""

    ngram: str = "word"        # "word" or "char" shingles
    n: int = 13                # shingle length in words or characters
    num_perm: int = 128        # permutations (signature length)
    bands: int = 32            # LSH bands ...
    rows: int = 4              # ... of this many rows each; bands * rows <= num_perm
    seed: int = 1
    normalize: bool = True     # lowercase, strip ASCII punctuation, collapse whitespace (Zyda-1 text.py)

    def __post_init__(self):
        if self.ngram not in ("word", "char"):
            raise UserError(f"dedup ngram must be 'word' or 'char', not {self.ngram!r}")
        if self.n < 1 or self.num_perm < 1 or self.bands < 1 or self.rows < 1:
            raise UserError("dedup n, num_perm, bands and rows must be positive")
        if self.bands * self.rows > self.num_perm:
            raise UserError(f"bands x rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")

    @property
    def threshold(self) -> float:
        """Jaccard at which a pair becomes a candidate with probability ~1/2: (1/b)^(1/r)."""
        return (1 / self.bands) ** (1 / self.rows)


PRESETS = {
    # Zyda-1: word 13-grams, datasketch MinHash(128), LSH at Jaccard 0.4 -> _optimal_param = (32, 4)
    "zyda1": MinHashParams("word", 13, 128, 32, 4, normalize=True),
    # Zyda-2 (NeMo Curator): char 25-grams on the raw text, 128 hashes, 8 buckets x 16 (~0.85 Jaccard)
    "zyda2": MinHashParams("char", 25, 128, 8, 16, normalize=False),
}


def fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: an avalanching bijection (uint64 arrays wrap, which is intended)."""
    x = x ^ (x >> M64(33))
    x = x * M64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> M64(33))
    x = x * M64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> M64(33))


class _Powers:
    """B^i and B^-i mod 2^64, grown on demand (documents longer than any seen so far)."""

    def __init__(self, base: int):
        self.base, self.inv = base, pow(base, -1, 2**64)
        self.pow = self.ipow = np.ones(1, dtype=np.uint64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n > len(self.pow):
            size = max(n, 2 * len(self.pow), 1 << 16)
            self.pow, self.ipow = (np.cumprod(np.r_[np.ones(1, np.uint64), np.full(size - 1, b, np.uint64)])
                                   for b in (self.base, self.inv))
        return self.pow[:n], self.ipow[:n]


_CHARS = _Powers(0x9E3779B97F4A7C15)   # any odd constants do
_WORDS = _Powers(0xD6E8FEB86659FD93)


def _hash_windows(x: np.ndarray, starts: np.ndarray, ends: np.ndarray, powers: _Powers) -> np.ndarray:
    """Position-independent hashes of x[starts[k]:ends[k]] (uint64)."""
    p, ip = powers.get(len(x) + 1)
    prefix = np.zeros(len(x) + 1, dtype=np.uint64)
    np.cumsum(x * p[:len(x)], out=prefix[1:])
    return fmix64((prefix[ends] - prefix[starts]) * ip[starts])


def _shingle_bounds(lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows of n units inside each segment of `lengths` (> 0) laid end to end: (starts, ends, count per
    segment). A segment shorter than n is one window."""
    offsets = np.cumsum(lengths) - lengths
    count = np.maximum(lengths - n + 1, 1)
    first = np.cumsum(count) - count                                 # index of each segment's first window
    seg = np.repeat(np.arange(len(lengths)), count)
    starts = offsets[seg] + np.arange(count.sum()) - first[seg]
    return starts, np.minimum(starts + n, (offsets + lengths)[seg]), count


def prepare_text(text: str, params: MinHashParams) -> str:
    if params.normalize:
        text = unicodedata.normalize("NFC", text).lower().translate(_PUNCT)
    return " ".join(text.split()) if params.ngram == "word" or params.normalize else text


def batch_shingle_hashes(texts: list[str], params: MinHashParams) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every shingle of every document, concatenated, and the count per document.

    Repeats are kept (the min does not care); a document shorter than one shingle is a single shingle,
    an empty one has none. The whole batch is hashed with a handful of numpy calls, so the Python
    overhead per document stays small.
    """
    texts = [prepare_text(t, params) for t in texts]
    counts = np.zeros(len(texts), dtype=np.int64)
    keep = [i for i, t in enumerate(texts) if t]
    if not keep:
        return np.empty(0, dtype=np.uint64), counts
    kept = [texts[i] for i in keep]
    if params.ngram == "char":
        cp = np.frombuffer("".join(kept).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        units, lengths = cp, np.array([len(t) for t in kept])
    else:  # words are separated by single spaces, and so are documents
        cp = np.frombuffer(" ".join(kept).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        spaces = np.flatnonzero(cp == 32)
        units = _hash_windows(cp, np.r_[0, spaces + 1], np.r_[spaces, len(cp)], _CHARS)  # one per word
        lengths = np.array([t.count(" ") + 1 for t in kept])
    starts, ends, counts[keep] = _shingle_bounds(lengths, params.n)
    return _hash_windows(units, starts, ends, _CHARS if params.ngram == "char" else _WORDS), counts


def shingle_hashes(text: str, params: MinHashParams) -> np.ndarray:
    """uint64 hash of every shingle of one document."""
    return batch_shingle_hashes([text], params)[0]


def shingle_strings(text: str, params: MinHashParams) -> set[str]:
    """The same shingles as plain strings: the slow, obvious version, for tests and datasketch."""
    text = prepare_text(text, params)
    if not text:
        return set()
    units = text.split(" ") if params.ngram == "word" else list(text)
    n = min(params.n, len(units))
    sep = " " if params.ngram == "word" else ""
    return {sep.join(units[i:i + n]) for i in range(len(units) - n + 1)}


def permutations(params: MinHashParams) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the P multiply-add-shift hash functions; a is odd."""
    rng = np.random.default_rng(params.seed)
    a = rng.integers(0, 2**63, size=params.num_perm, dtype=np.uint64) * M64(2) + M64(1)
    b = rng.integers(0, 2**63, size=params.num_perm, dtype=np.uint64)
    return a, b


class MinHasher:
    """Signatures [D, P] uint32 for batches of documents."""

    def __init__(self, params: MinHashParams, batch_shingles: int = 1 << 15):
        self.params = params
        self.a, self.b = (v[:, None] for v in permutations(params))   # [P, 1]
        self.batch_shingles = batch_shingles  # bounds the [P, S] uint64 buffer (128 x 32k x 8 B = 32 MiB)
        self._buf = np.empty((params.num_perm, batch_shingles), dtype=np.uint64)

    def signatures(self, texts: list[str]) -> np.ndarray:
        return self.from_hashes(*batch_shingle_hashes(texts, self.params))

    def from_hashes(self, hashes: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Signatures from concatenated shingle hashes and the count per document."""
        sig = np.full((len(counts), self.params.num_perm), EMPTY, dtype=np.uint32)
        docs = np.flatnonzero(counts)
        ends = np.cumsum(counts[docs])
        keys = hashes >> M64(32)                                        # [S] 32-bit keys
        lo = 0
        while lo < len(docs):  # documents in groups of about batch_shingles shingles
            base = ends[lo - 1] if lo else 0
            hi = max(lo + 1, int(np.searchsorted(ends, base + self.batch_shingles, side="right")))
            x = keys[base:ends[hi - 1]]
            # one long document may overflow the buffer: it then gets a temporary of its own
            v = np.multiply(self.a, x, out=self._buf[:, :len(x)]) if len(x) <= self.batch_shingles else self.a * x
            v += self.b                                                 # [P, S]
            starts = np.r_[0, ends[lo:hi - 1] - base]
            # the >> 32 is monotone, so it comes after the min (on [P, D] instead of [P, S])
            sig[docs[lo:hi]] = (np.minimum.reduceat(v, starts, axis=1) >> M64(32)).T
            lo = hi
        return sig


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One uint64 key per (band, document) [K, D]: documents share a key iff their R rows agree (up to 2^-64)."""
    d = sig.shape[0]
    s = sig[:, :bands * rows].reshape(d, bands, rows).astype(np.uint64)
    key = s[:, :, 0]
    for j in range(1, rows):  # an order-sensitive fold: (x, y) and (y, x) get different keys
        key = fmix64(key * M64(0x100000001B3) + s[:, :, j])
    return np.ascontiguousarray(fmix64(key + np.arange(bands, dtype=np.uint64)).T)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Share of equal signature entries (last axis)."""
    return np.mean(sig_a == sig_b, axis=-1)


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard of two shingle-hash sets."""
    a, b = np.unique(a), np.unique(b)
    union = len(np.union1d(a, b))
    return len(np.intersect1d(a, b, assume_unique=True)) / union if union else 1.0
