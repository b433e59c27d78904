"""Token shards: `prepare` tokenizes text into them, `PackedLoader` reads them as packed training rows.

A data folder holds meta.json and, per shard, `shard-NNNNN.bin` (the tokens of whole documents, each
<s> ... </s>, as uint16/uint32) and `shard-NNNNN.docs.npy` (int64 start offset of every document,
plus the end). Shards are memory-mapped, so the corpus never has to fit in memory.

Rows are cut from the concatenated token stream in order; a row spans several documents, and
`doc_ids` tell the model where they change, so packed documents stay isolated (see Zamba2LM.forward).
The target of a document's last token would be the next document's <s>: it is masked (-100).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, read_json
from ..model.score import IGNORE
from ..text.tokenizer import Tokenizer



def prepare(documents: Iterable[str], out: str | Path, tokenizer: Tokenizer,
            shard_tokens: int = 100_000_000, stats: dict | None = None) -> dict:
    """Tokenize documents into shards under `out`; returns (and writes) meta.json's contents."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    shards, buf, starts, n_docs = [], [], [0], 0

    def flush():
        if len(starts) == 1:
            return
        name = f"shard-{len(shards):05d}"
        np.asarray(buf, dtype=dtype).tofile(out / f"{name}.bin")
        np.save(out / f"{name}.docs.npy", np.asarray(starts, dtype=np.int64))
        shards.append({"name": name, "tokens": starts[-1], "docs": len(starts) - 1})
        buf.clear()
        del starts[1:]

    for text in documents:
        ids = tokenizer.encode(text) + [tokenizer.eos_id]
        if len(ids) <= 2:  # empty document
            continue
        buf.extend(ids)
        starts.append(len(buf))
        n_docs += 1
        if len(buf) >= shard_tokens:
            flush()
    flush()
    if not shards:
        raise UserError("no documents to prepare (all inputs empty or malformed)")
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id, "tokenizer": str(tokenizer.path), "shards": shards,
            "tokens": sum(s["tokens"] for s in shards), "docs": n_docs,
            "bad_lines": (stats or {}).get("bad_lines", 0)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


class TokenData:
    """The shards of a data folder, memory-mapped, as one stream with document starts."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        try:
            self.meta = read_json(folder / "meta.json")
        except FileNotFoundError:
            raise FileNotFoundError(f"{folder}: no meta.json (run `zamba2 prepare` first)") from None
        self.shards, self.doc_starts, offset = [], [], 0
        for s in self.meta["shards"]:
            path = folder / f"{s['name']}.bin"
            if not path.exists():
                raise FileNotFoundError(f"{path}: shard listed in meta.json is missing")
            self.shards.append(np.memmap(path, dtype=self.meta["dtype"], mode="r"))
            self.doc_starts.append(np.load(folder / f"{s['name']}.docs.npy")[:-1] + offset)
            offset += s["tokens"]
        self.num_tokens = offset
        self.doc_starts = np.concatenate(self.doc_starts)  # [docs] global start offsets
        self.shard_offsets = np.cumsum([0] + [s["tokens"] for s in self.meta["shards"]])

    def tokens(self, lo: int, hi: int) -> np.ndarray:
        parts = []
        for i, mm in enumerate(self.shards):
            a, b = max(lo, self.shard_offsets[i]), min(hi, self.shard_offsets[i + 1])
            if a < b:
                parts.append(mm[a - self.shard_offsets[i]:b - self.shard_offsets[i]])
        return np.concatenate(parts).astype(np.int64)

    def split_point(self, val_fraction: float) -> int:
        """Token offset where the validation documents (the last `val_fraction` of documents) begin."""
        n_val = max(1, round(val_fraction * len(self.doc_starts))) if val_fraction > 0 else 0
        if n_val >= len(self.doc_starts):
            raise UserError("val_fraction leaves no training documents")
        return int(self.doc_starts[-n_val]) if n_val else self.num_tokens


class PackedLoader:
    """Rows of seq_len tokens (+1 for the targets) cut in order from a token range, wrapping around.

    Resumable: `state_dict()` is the position in the stream.
    """

    def __init__(self, data: TokenData, seq_len: int, batch_size: int, lo: int = 0, hi: int | None = None):
        self.data, self.seq_len, self.batch_size = data, seq_len, batch_size
        self.lo, self.hi = lo, data.num_tokens if hi is None else hi
        if self.hi - self.lo < seq_len + 1:
            raise UserError(f"only {self.hi - self.lo} tokens in this split; need at least seq_len+1 = {seq_len + 1}")
        self.pos = lo

    def row(self) -> tuple[np.ndarray, np.ndarray]:
        if self.pos + self.seq_len + 1 > self.hi:
            self.pos = self.lo
        a, b = self.pos, self.pos + self.seq_len + 1
        self.pos += self.seq_len
        docs = np.searchsorted(self.data.doc_starts, np.arange(a, b), side="right")  # document of each token
        return self.data.tokens(a, b), docs

    def next_batch(self) -> dict[str, torch.Tensor]:
        return collate([self.row() for _ in range(self.batch_size)])

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def collate(rows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """(tokens, document of each token) rows of seq_len+1 -> inputs, targets and doc_ids [b, seq_len]."""
    tok = torch.from_numpy(np.stack([r[0] for r in rows]))
    doc = torch.from_numpy(np.stack([r[1] for r in rows]))
    labels = tok[:, 1:].clone()
    labels[doc[:, 1:] != doc[:, :-1]] = IGNORE  # no predicting the next document's <s>
    doc = doc[:, :-1]
    return {"input_ids": tok[:, :-1], "labels": labels, "doc_ids": doc - doc[:, :1]}


class MixedLoader:
    """Annealing mix: each row comes from `main` or, with probability `replay`, from `other` (seeded)."""

    def __init__(self, main: PackedLoader, other: PackedLoader, replay: float, seed: int = 0):
        self.main, self.other, self.replay = main, other, replay
        self.batch_size = main.batch_size
        self.rng = np.random.default_rng(seed)

    def next_batch(self) -> dict[str, torch.Tensor]:
        return collate([(self.other if self.rng.random() < self.replay else self.main).row()
                        for _ in range(self.batch_size)])

    def state_dict(self) -> dict:
        return {"main": self.main.state_dict(), "other": self.other.state_dict(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.main.load_state_dict(state["main"])
        self.other.load_state_dict(state["other"])
        self.rng.bit_generator.state = state["rng"]
