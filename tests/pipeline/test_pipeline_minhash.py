"""MinHash: the vectorised shingles equal the plain-string ones, estimates agree with exact Jaccard
(and with datasketch's on the same shingles), and the union-find equals the textbook one."""

import numpy as np
import pytest

from zamba2.pipeline.dedup import UnionFind, components, removal_kinds, star_edges, survivors
from zamba2.pipeline.minhash import (PRESETS, MinHasher, MinHashParams, band_keys, batch_shingle_hashes,
                                     estimate_jaccard, exact_jaccard, shingle_hashes, shingle_strings)
from helpers.synthetic import Generator

TEXTS = ["", "one", "Short text, under one shingle!", "Ünïcödé  text — with ñ and 中文 characters\tand tabs " * 5,
         Generator(0).document()]


def test_presets_are_the_papers():
    z1, z2 = PRESETS["zyda1"], PRESETS["zyda2"]
    assert (z1.ngram, z1.n, z1.num_perm, z1.bands, z1.rows) == ("word", 13, 128, 32, 4)
    assert (z2.ngram, z2.n, z2.num_perm, z2.bands, z2.rows) == ("char", 25, 128, 8, 16)
    assert z1.threshold == pytest.approx(0.42, abs=0.01) and z2.threshold == pytest.approx(0.878, abs=0.001)
    with pytest.raises(ValueError, match="exceeds num_perm"):
        MinHashParams(bands=64, rows=4)


@pytest.mark.parametrize("preset", ["zyda1", "zyda2"])
def test_shingle_hashes_match_string_shingles(preset):
    params = PRESETS[preset]
    for text in TEXTS:
        strings = sorted(shingle_strings(text, params))
        hashes = shingle_hashes(text, params)
        assert len(np.unique(hashes)) == len(strings)
        # equal shingles hash equally wherever they stand: hash each shingle string on its own
        alone = [shingle_hashes(s, MinHashParams(params.ngram, params.n, normalize=False))[0] for s in strings]
        assert set(alone) == set(hashes.tolist())


def test_batch_equals_one_by_one():
    params = PRESETS["zyda1"]
    hasher = MinHasher(params, batch_shingles=300)  # forces several groups and an oversized document
    gen = Generator(1)
    texts = TEXTS + [gen.document() for _ in range(20)]
    sig = hasher.signatures(texts)
    assert all((hasher.signatures([t])[0] == s).all() for t, s in zip(texts, sig))
    hashes, counts = batch_shingle_hashes(texts, params)
    assert counts[0] == 0 and (sig[0] == 0xFFFFFFFF).all() and counts.sum() == len(hashes)


def _pairs(n=60, seed=0):
    gen = Generator(seed)
    out = []
    for k in range(n):
        a = gen.document((150, 250))
        b = gen.variant(a, "edit", edit_words=k % 12)
        out.append((a, b))
    return out


def test_estimate_agrees_with_exact_jaccard():
    params = PRESETS["zyda1"]
    hasher = MinHasher(params)
    errors = []
    for a, b in _pairs():
        sig = hasher.signatures([a, b])
        j = exact_jaccard(shingle_hashes(a, params), shingle_hashes(b, params))
        assert j == pytest.approx(len(shingle_strings(a, params) & shingle_strings(b, params))
                                  / len(shingle_strings(a, params) | shingle_strings(b, params)))
        sd = np.sqrt(j * (1 - j) / params.num_perm)
        errors.append((estimate_jaccard(sig[0], sig[1]) - j, sd))
    err, sd = np.array(errors).T
    assert (np.abs(err) <= 4 * sd + 1e-9).all()                 # every estimate within 4 sigma
    assert abs(err.mean()) < 3 * np.sqrt((sd**2).mean() / len(err))   # and unbiased


def test_same_estimates_as_datasketch():
    datasketch = pytest.importorskip("datasketch")
    params = PRESETS["zyda1"]
    hasher = MinHasher(params)
    ours, theirs = [], []
    for a, b in _pairs(40, seed=2):
        sa, sb = shingle_strings(a, params), shingle_strings(b, params)
        j = len(sa & sb) / len(sa | sb)
        ma, mb = datasketch.MinHash(num_perm=128), datasketch.MinHash(num_perm=128)
        ma.update_batch([s.encode() for s in sa]), mb.update_batch([s.encode() for s in sb])
        sig = hasher.signatures([a, b])
        ours.append(estimate_jaccard(sig[0], sig[1]) - j), theirs.append(ma.jaccard(mb) - j)
    # both are unbiased with the binomial spread: their errors have the same size
    rms_ours, rms_theirs = np.sqrt(np.mean(np.square(ours))), np.sqrt(np.mean(np.square(theirs)))
    assert rms_ours < 0.06 and rms_theirs < 0.06 and 0.5 < rms_ours / rms_theirs < 2


def test_band_keys_equal_iff_rows_equal():
    rng = np.random.default_rng(0)
    sig = rng.integers(0, 2**32, size=(6, 128), dtype=np.uint64).astype(np.uint32)
    sig[1] = sig[0]
    sig[2, :4] = sig[0, :4]                  # only band 0 shared
    sig[3, :4] = sig[0, [1, 0, 2, 3]]        # same values, other order: not shared
    keys = band_keys(sig, 32, 4)
    assert keys.shape == (32, 6)
    assert (keys[:, 1] == keys[:, 0]).all()
    assert keys[0, 2] == keys[0, 0] and (keys[1:, 2] != keys[1:, 0]).all()
    assert (keys[:, 3] != keys[:, 0]).all()
    assert len(np.unique(keys[:, [0, 4, 5]])) == 3 * 32      # bands are keyed apart


def test_components_equal_union_find():
    rng = np.random.default_rng(0)
    for n, m in [(1, 0), (10, 3), (200, 150), (1000, 990), (500, 2000)]:
        u, v = rng.integers(0, n, size=(2, m))
        uf = UnionFind(n)
        for a, b in zip(u.tolist(), v.tolist()):
            uf.union(a, b)
        assert (components(n, u, v) == uf.labels()).all()
    chain = np.arange(999)  # a long path: worst case for pointer jumping
    assert (components(1000, chain, chain + 1) == 0).all()


def test_star_edges_and_survivors():
    keys = np.array([5, 7, 5, 9, 7, 5], dtype=np.uint64)
    u, v = star_edges(keys)
    assert sorted(zip(u.tolist(), v.tolist())) == [(0, 2), (0, 5), (1, 4)]
    labels = components(6, u, v)
    rank = np.array([2, 0, 1, 0, 0, 0])     # document 5 is the best-ranked of cluster {0, 2, 5}
    assert survivors(labels, rank, "all").tolist() == [False, True, False, True, False, True]
    # cross-source-only keeps every document of the cluster's best source (1 and 4 are both rank 0)
    assert survivors(labels, rank, "cross-source-only").tolist() == [False, True, False, True, True, True]
    keep = survivors(labels, rank, "all")
    within = removal_kinds(labels, keep, source=rank)
    assert within.tolist() == [False, False, True]    # removed: 0 (across), 2 (across), 4 (within)
    with pytest.raises(ValueError, match="mode"):
        survivors(labels, rank, "some")
