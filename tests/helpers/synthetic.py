"""Generated corpora with planted duplicates, for the tests and the benchmark (no downloads).

Words are random letter strings drawn with Zipf frequencies, documents are a few paragraphs of
sentences, so they pass the heuristic filters. Some documents get copies, in the same or another
source, of one of these kinds:

- exact:       the same text
- edit:        a few words replaced, inserted or deleted (`edit_words` of them)
- reorder:     the paragraphs shuffled
- boilerplate: a shared paragraph (a cookie notice, say) added at the end

`origin[i]` names the document a variant came from, so the true duplicate pairs are known.
Unrelated documents also share boilerplate, which must not make them duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KINDS = ("exact", "edit", "reorder", "boilerplate")


@dataclass
class Corpus:
    texts: list[str] = field(default_factory=list)
    source: list[int] = field(default_factory=list)     # index of the source of each document
    origin: list[int] = field(default_factory=list)     # the original document each one comes from
    kind: list[str] = field(default_factory=list)       # "original" or one of KINDS


class Generator:
    def __init__(self, seed: int = 0, vocab: int = 20_000):
        self.rng = np.random.default_rng(seed)
        letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
        p = 1 / np.arange(1, 27) ** 0.8
        lengths = self.rng.integers(2, 10, size=vocab)
        chars = letters[self.rng.choice(26, size=(vocab, 9), p=p / p.sum())]
        self.words = np.array(["".join(row[:n]) for row, n in zip(chars, lengths)])
        zipf = np.cumsum(1 / np.arange(1, vocab + 1) ** 1.05)
        self.cdf = zipf / zipf[-1]
        self.boilerplate = [self.paragraph(40) for _ in range(5)]

    def paragraph(self, n_words: int) -> str:
        words = self.words[np.minimum(np.searchsorted(self.cdf, self.rng.random(n_words)), len(self.words) - 1)]
        cuts = np.cumsum(self.rng.integers(8, 20, size=n_words // 8 + 1))
        sentences = [" ".join(s) for s in np.split(words, cuts[cuts < n_words]) if len(s)]
        return " ".join(s[0].upper() + s[1:] + "." for s in sentences)

    def document(self, words: tuple[int, int] = (80, 200)) -> str:
        n = int(self.rng.integers(*words))
        k = int(self.rng.integers(2, 6))
        sizes = np.maximum(self.rng.multinomial(n - 5 * k, np.ones(k) / k) + 5, 5)
        return "\n\n".join(self.paragraph(int(s)) for s in sizes)

    def variant(self, text: str, kind: str, edit_words: int = 2) -> str:
        if kind == "exact":
            return text
        if kind == "reorder":
            paras = text.split("\n\n")
            order = self.rng.permutation(len(paras))
            while len(paras) > 1 and (order == np.arange(len(paras))).all():
                order = self.rng.permutation(len(paras))
            return "\n\n".join(paras[i] for i in order)
        if kind == "boilerplate":
            return text + "\n\n" + self.boilerplate[int(self.rng.integers(len(self.boilerplate)))]
        words = text.split(" ")
        for _ in range(edit_words):
            i = int(self.rng.integers(len(words)))
            op = self.rng.integers(3)
            new = str(self.words[self.rng.integers(len(self.words))])
            if op == 0:
                words[i] = new
            elif op == 1:
                words.insert(i, new)
            elif len(words) > 1:
                del words[i]
        return " ".join(words)

    def corpus(self, n_docs: int, n_sources: int = 3, dup_rate: float = 0.3, cross_rate: float = 0.5,
               edit_words: int = 2, kinds: tuple[str, ...] = KINDS, boilerplate_rate: float = 0.1,
               words: tuple[int, int] = (80, 200)) -> Corpus:
        """About n_docs documents: originals, plus for a `dup_rate` share of them 1-2 variants, each in
        another source with probability `cross_rate`. A `boilerplate_rate` share of the originals end
        with a shared boilerplate paragraph (unrelated documents that must stay apart)."""
        c = Corpus()
        while len(c.texts) < n_docs:
            text = self.document(words)
            if self.rng.random() < boilerplate_rate:
                text = self.variant(text, "boilerplate")
            i, src = len(c.texts), int(self.rng.integers(n_sources))
            c.texts.append(text), c.source.append(src), c.origin.append(i), c.kind.append("original")
            if self.rng.random() < dup_rate:
                for _ in range(int(self.rng.integers(1, 3))):
                    kind = str(self.rng.choice(kinds))
                    other = src if self.rng.random() >= cross_rate or n_sources == 1 else \
                        int((src + self.rng.integers(1, n_sources)) % n_sources)
                    c.texts.append(self.variant(text, kind, edit_words))
                    c.source.append(other), c.origin.append(i), c.kind.append(kind)
        return c


def pair_scores(labels: np.ndarray, origin: np.ndarray) -> tuple[float, float]:
    """Precision and recall of the duplicate pairs implied by cluster `labels`, against `origin`.

    Pairs are counted, not listed: a group of k documents holds k(k-1)/2 pairs, and the pairs found
    and true at once are those within each (cluster, origin) cell.
    """
    def pairs(*keys: np.ndarray) -> int:
        k = np.unique(np.stack(keys), axis=1, return_counts=True)[1].astype(np.int64)
        return int((k * (k - 1) // 2).sum())

    labels, origin = np.asarray(labels), np.asarray(origin)
    found, truth, both = pairs(labels), pairs(origin), pairs(labels, origin)
    return (both / found if found else 1.0), (both / truth if truth else 1.0)
