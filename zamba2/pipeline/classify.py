"""Quality classification: a pluggable model, and which documents it keeps.

Zyda-2 kept only `quality_pred == "High"` from NeMo's DeBERTa quality classifier (labels Low/Medium/High)
on Zyda-1 and Dolma-CC, and FineWeb-Edu documents with `int_score >= 3`. Those models need hub weights,
so here a classifier is anything with `predict(texts) -> (labels, scores)`:

- a `.npz` file written by `HashedLogistic.save` (a small local model, trained in a few seconds), or
- "package.module:factory", a callable returning such an object (wrap a transformers model here).

The score is the expected label index under the predicted distribution (labels ordered worst to
best), the analogue of FineWeb-Edu's regression score; `min_score` thresholds it, `keep_labels`
keeps documents by their most likely label.
"""

from __future__ import annotations

import importlib
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from ..errors import UserError

_WORD = re.compile(r"\w+")


class Classifier(Protocol):
    def predict(self, texts: list[str]) -> tuple[list[str], np.ndarray]: ...


class HashedLogistic:
    """Softmax regression over hashed word unigrams and bigrams (L2-normalised counts)."""

    def __init__(self, labels: list[str], n_features: int = 1 << 14):
        self.labels, self.n_features = list(labels), n_features
        self.w = np.zeros((n_features, len(labels)), dtype=np.float32)
        self.b = np.zeros(len(labels), dtype=np.float32)

    def features(self, texts: list[str]) -> np.ndarray:
        x = np.zeros((len(texts), self.n_features), dtype=np.float32)
        for i, text in enumerate(texts):
            words = _WORD.findall(text.lower())
            grams = words + [a + " " + b for a, b in zip(words, words[1:])]
            idx = [zlib.crc32(g.encode()) % self.n_features for g in grams]  # crc32: stable across processes
            np.add.at(x[i], idx, 1.0)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)

    def probabilities(self, texts: list[str]) -> np.ndarray:
        z = self.features(texts) @ self.w + self.b
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def fit(self, texts: list[str], labels: list[str], epochs: int = 200, lr: float = 2.0,
            l2: float = 1e-4) -> "HashedLogistic":
        x = self.features(texts)
        y = np.eye(len(self.labels), dtype=np.float32)[[self.labels.index(l) for l in labels]]
        for _ in range(epochs):  # full-batch gradient descent on the cross-entropy
            z = x @ self.w + self.b
            p = np.exp(z - z.max(axis=1, keepdims=True))
            g = (p / p.sum(axis=1, keepdims=True) - y) / len(texts)
            self.w -= lr * (x.T @ g + l2 * self.w)
            self.b -= lr * g.sum(axis=0)
        return self

    def predict(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        p = self.probabilities(texts)
        return [self.labels[i] for i in p.argmax(axis=1)], p @ np.arange(len(self.labels), dtype=np.float32)

    def save(self, path: str | Path) -> None:
        np.savez(path, w=self.w, b=self.b, labels=np.array(self.labels))

    @classmethod
    def load(cls, path: str | Path) -> "HashedLogistic":
        with np.load(path) as f:
            model = cls(list(f["labels"]), f["w"].shape[0])
            model.w, model.b = f["w"], f["b"]
        return model


def load_classifier(spec: str) -> Classifier:
    """A classifier from a .npz path or a "module:factory" reference."""
    if spec.endswith(".npz"):
        if not Path(spec).exists():
            raise FileNotFoundError(f"classifier model {spec} not found")
        return HashedLogistic.load(spec)
    module, sep, attr = spec.partition(":")
    if not sep:
        raise UserError(f"classifier {spec!r}: give a .npz model or 'module:factory'")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"classifier {spec!r}: {e}") from None
    return factory()


@dataclass
class ClassifyConfig:
    model: str                                              # .npz or module:factory
    keep_labels: list[str] = field(default_factory=list)    # keep documents predicted as one of these ...
    min_score: float | None = None                          # ... and/or with score >= this
    sources: list[str] = field(default_factory=list)        # sources to classify (empty: all)
    batch_size: int = 256

    def __post_init__(self):
        if not self.keep_labels and self.min_score is None:
            raise UserError("[classify]: set keep_labels and/or min_score")

    def keeps(self, labels: list[str], scores: np.ndarray) -> np.ndarray:
        keep = np.ones(len(labels), dtype=bool)
        if self.keep_labels:
            keep &= np.isin(np.array(labels, dtype=object), self.keep_labels)
        if self.min_score is not None:
            keep &= np.asarray(scores) >= self.min_score
        return keep
