"""The work of one task, the same under every executor.

1. `prepare_file`: one input file -> work shards of `shard_docs` documents: read, normalize, filter,
   and sketch for dedup (an exact-text hash and one LSH key per band).
2. `band_edges`: one key row (the exact hash or one band) over all shards -> candidate pairs.
   `dedup_corpus` (in the driver) joins the pairs into clusters and picks the survivors.
3. `select_shard`: one work shard -> drop duplicates, classify, tokenize (or write the documents).

A task reads its inputs from and writes its outputs to the work folder, and writes a small JSON
marker last; it returns that marker's contents. A task whose marker exists is not redone, so a
crashed run resumes from the last finished shard, and a task runs the same in this process, in a
worker process or on a Ray node (which then needs the work folder on a shared file system).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .config import PipelineConfig, Source
from .dedup import components, removal_kinds, star_edges, survivors
from .filters import Filter
from .minhash import MinHasher, band_keys, batch_shingle_hashes, fmix64
from .normalize import normalize
from .read import chunks

_CACHE: dict = {}  # per process: tokenizers and classifiers, loaded once
SKETCH_BATCH = 2000  # documents hashed together


def write_json(path: Path, obj) -> None:
    """Atomic: a marker is either absent or complete."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(path.read_text())


def _source(cfg: PipelineConfig, name: str) -> Source:
    return next(s for s in cfg.sources if s.name == name)


def _tokenizer(cfg: PipelineConfig):
    from ..text.tokenizer import named_tokenizer

    key = ("tok", cfg.tokenize.tokenizer)
    if key not in _CACHE:
        _CACHE[key] = named_tokenizer(cfg.tokenize.tokenizer)
    return _CACHE[key]


def _counts(texts: list[str], tokens: np.ndarray | None) -> dict:
    out = {"docs": len(texts), "chars": sum(map(len, texts))}
    if tokens is not None:
        out["tokens"] = int(tokens.sum())
    return out


def _stage(before: dict, after: dict, seconds: float, **extra) -> dict:
    """One stage's line: docs/chars/tokens in and out."""
    line = {f"{k}_in": v for k, v in before.items()} | {f"{k}_out": v for k, v in after.items()}
    return line | {"seconds": round(seconds, 4)} | extra


def _token_counts(cfg: PipelineConfig, texts: list[str]) -> np.ndarray | None:
    if not cfg.count_tokens:
        return None
    tok = _tokenizer(cfg)
    return np.array([len(tok.encode(t)) + 1 for t in texts], dtype=np.int64)  # + </s>, as in the shards


# ---------------------------------------------------------------- 1. read, normalize, filter, sketch

def prepare_file(task: dict) -> dict:
    cfg = PipelineConfig.from_dict(task["config"])
    src = _source(cfg, task["source"])
    folder = Path(cfg.work) / "prep" / src.name
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / f"{task['index']:05d}.done.json"
    if done.exists():
        return read_json(done)
    flt = Filter(cfg.filter) if "filter" in cfg.stages and src.filter else None
    hasher = MinHasher(cfg.dedup.params) if "dedup" in cfg.stages and cfg.dedup.near else None
    shards = []
    for index, texts, bad in chunks(task["file"], src.text_key, cfg.shard_docs):
        name = f"{task['index']:05d}-{index:05d}"
        marker = folder / f"{name}.json"
        if not marker.exists():
            write_json(marker, _prepare_shard(cfg, src, name, texts, bad, flt, hasher, folder / name))
        shards.append(read_json(marker))
    summary = {"source": src.name, "file": task["file"], "shards": shards}
    write_json(done, summary)
    return summary


def _prepare_shard(cfg, src, name, texts, bad, flt, hasher, path: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    tokens = _token_counts(cfg, texts)
    stages = {"read": _stage({"docs": len(texts) + bad}, _counts(texts, tokens), time.perf_counter() - t0,
                             bad_lines=bad)}
    raw = texts
    if "normalize" in cfg.stages:
        t0, before = time.perf_counter(), _counts(texts, tokens)
        texts = [normalize(t) for t in texts]
        tokens = _token_counts(cfg, texts)
        stages["normalize"] = _stage(before, _counts(texts, tokens), time.perf_counter() - t0)
    if flt is not None:
        t0, before = time.perf_counter(), _counts(texts, tokens)
        fired = [flt.fired(r, t) for r, t in zip(raw, texts)]
        keep = np.array([not f for f in fired], dtype=bool)
        texts = [t for t, k in zip(texts, keep) if k]
        tokens = tokens[keep] if tokens is not None else None
        rules = Counter(r for f in fired for r in f)
        stages["filter"] = _stage(before, _counts(texts, tokens), time.perf_counter() - t0,
                                  rules={r: rules.get(r, 0) for r in flt.rules})
    if "dedup" in cfg.stages:
        t0 = time.perf_counter()
        np.save(path.with_suffix(".keys.npy"), sketch(texts, hasher))
        stages["sketch"] = {"docs": len(texts), "seconds": round(time.perf_counter() - t0, 4)}
    columns = {"text": pa.array(texts, type=pa.large_string())}
    if tokens is not None:
        columns["tokens"] = pa.array(tokens, type=pa.int64())
    pq.write_table(pa.table(columns), path.with_suffix(".parquet"))
    return {"source": src.name, "shard": name, "docs": len(texts), "stages": stages}


def sketch(texts: list[str], hasher: MinHasher | None) -> np.ndarray:
    """Dedup keys [1 + bands, D] uint64: row 0 hashes the exact text, row 1 + k is LSH band k."""
    exact = np.array([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
                      for t in texts], dtype=np.uint64)
    if hasher is None:
        return exact[None, :]
    sigs, counts = [], []
    for i in range(0, len(texts), SKETCH_BATCH):  # batches bound the hashing temporaries (~20 B per character)
        hashes, c = batch_shingle_hashes(texts[i:i + SKETCH_BATCH], hasher.params)
        sigs.append(hasher.from_hashes(hashes, c)), counts.append(c)
    sig = np.concatenate(sigs) if sigs else np.zeros((0, hasher.params.num_perm), dtype=np.uint32)
    keys = band_keys(sig, hasher.params.bands, hasher.params.rows)
    empty = np.concatenate(counts or [np.zeros(0, dtype=np.int64)]) == 0  # no shingles: only the exact hash
    keys[:, empty] = fmix64(exact[empty][None, :] + np.arange(1, len(keys) + 1, dtype=np.uint64)[:, None])
    return np.concatenate([exact[None, :], keys])


# ---------------------------------------------------------------- 2. candidate pairs and clusters

def band_edges(task: dict) -> dict:
    out = Path(task["out"])
    if not out.exists():
        keys = np.concatenate([np.load(p, mmap_mode="r")[task["row"]] for p in task["keys"]])
        u, v = star_edges(keys)
        with open(out.with_suffix(".tmp"), "wb") as f:
            np.save(f, np.stack([u, v]))
        os.replace(out.with_suffix(".tmp"), out)
    return {"row": task["row"], "pairs": int(np.load(out, mmap_mode="r").shape[1])}


def dedup_corpus(cfg: PipelineConfig, shards: list[dict], executor) -> dict:
    """Clusters over all shards; writes a keep mask per shard and returns the dedup statistics."""
    folder = Path(cfg.work) / "dedup"
    if (folder / "stats.json").exists():
        return read_json(folder / "stats.json")
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    names = [s.name for s in cfg.sources]
    counts = np.array([s["docs"] for s in shards], dtype=np.int64)
    n = int(counts.sum())
    source = np.repeat([names.index(s["source"]) for s in shards], counts).astype(np.int64)
    rank = np.array([cfg.ranking.index(name) for name in names], dtype=np.int64)[source]
    key_files = [str(Path(cfg.work) / "prep" / s["source"] / f"{s['shard']}.keys.npy") for s in shards]
    rows = ([0] if cfg.dedup.exact else []) + (list(range(1, cfg.dedup.params.bands + 1)) if cfg.dedup.near else [])
    tasks = [{"row": r, "keys": key_files, "out": str(folder / f"pairs-{r:03d}.npy")} for r in rows]
    list(executor.map(band_edges, tasks, "dedup bands"))
    pairs = {r: np.load(folder / f"pairs-{r:03d}.npy") for r in rows}

    exact = pairs.get(0, np.zeros((2, 0), dtype=np.int64))
    near = np.concatenate([pairs[r] for r in rows if r] or [np.zeros((2, 0), dtype=np.int64)], axis=1)
    near = np.stack(np.divmod(np.unique(near[0] * n + near[1]), n)) if near.shape[1] else near  # drop repeats
    candidates, rejected = near.shape[1], 0
    if cfg.dedup.verify and candidates:
        ok = _verify(cfg, shards, counts, near, executor)
        near, rejected = near[:, ok], int((~ok).sum())
    keep_exact = survivors(components(n, *exact), rank, cfg.dedup.mode)
    labels = components(n, *np.concatenate([exact, near], axis=1))
    keep = survivors(labels, rank, cfg.dedup.mode)
    within = np.zeros(n, dtype=bool)
    within[~keep] = removal_kinds(labels, keep, source)

    np.save(folder / "clusters.npy", labels)  # smallest member of each document's cluster, in shard order
    bounds = np.r_[0, np.cumsum(counts)]
    for s, lo, hi in zip(shards, bounds[:-1], bounds[1:]):
        (folder / s["source"]).mkdir(exist_ok=True)
        np.save(folder / s["source"] / f"{s['shard']}.keep.npy", keep[lo:hi])
    sizes = np.bincount(labels, minlength=n)
    per_source = {}
    for i, name in enumerate(names):
        mine = source == i
        per_source[name] = {"docs_in": int(mine.sum()), "docs_out": int((keep & mine).sum()),
                            "exact_duplicates": int((~keep_exact & mine).sum()),
                            "near_duplicates": int((~keep & keep_exact & mine).sum()),
                            "within_source": int((~keep & within & mine).sum()),
                            "across_sources": int((~keep & ~within & mine).sum())}
    stats = {"docs": n, "mode": cfg.dedup.mode, "params": asdict(cfg.dedup.params),
             "exact_pairs": int(exact.shape[1]), "candidate_pairs": candidates, "rejected_pairs": rejected,
             "clusters": int((sizes > 1).sum()), "largest_cluster": int(sizes.max()) if n else 0,
             "seconds": round(time.perf_counter() - t0, 3), "sources": per_source}
    write_json(folder / "stats.json", stats)
    return stats


def _verify(cfg: PipelineConfig, shards: list[dict], counts: np.ndarray, pairs: np.ndarray, executor) -> np.ndarray:
    """Exact shingle Jaccard >= threshold, per candidate pair (drops LSH false positives).

    In two rounds of tasks, so that no process holds more than two shards' worth of shingles: each
    shard writes the sorted shingle sets of its documents that appear in a pair, then each block of
    pairs between two shards compares them (memory-mapped).
    """
    folder = Path(cfg.work) / "dedup" / "verify"
    folder.mkdir(exist_ok=True)
    bounds = np.r_[0, np.cumsum(counts)]
    shard_of = np.searchsorted(bounds, pairs, side="right") - 1                  # [2, E]
    needed = np.unique(pairs)
    tasks = []
    for k, s in enumerate(shards):
        mine = needed[(needed >= bounds[k]) & (needed < bounds[k + 1])]
        if len(mine):
            np.save(folder / f"need-{k:05d}.npy", mine - bounds[k])
            tasks.append({"config": cfg.to_dict(), "source": s["source"], "shard": s["shard"],
                          "need": str(folder / f"need-{k:05d}.npy"), "out": str(folder / f"shingles-{k:05d}")})
    list(executor.map(shard_shingles, tasks, "verify: shingles"))
    block = shard_of[0] * len(shards) + shard_of[1]
    order = np.argsort(block, kind="stable")
    starts = np.flatnonzero(np.r_[True, block[order][1:] != block[order][:-1]])
    tasks = []
    for lo, hi in zip(starts, np.r_[starts[1:], len(order)]):
        a, b = shard_of[:, order[lo]]
        name = folder / f"pairs-{a:05d}-{b:05d}.npy"
        np.save(name, pairs[:, order[lo:hi]] - bounds[[a, b]][:, None])
        tasks.append({"pairs": str(name), "a": str(folder / f"shingles-{a:05d}"),
                      "b": str(folder / f"shingles-{b:05d}"), "threshold": cfg.dedup.jaccard_threshold})
    list(executor.map(verify_pairs, tasks, "verify: pairs"))
    ok = np.zeros(pairs.shape[1], dtype=bool)
    for t, lo, hi in zip(tasks, starts, np.r_[starts[1:], len(order)]):
        ok[order[lo:hi]] = np.load(t["pairs"].replace(".npy", ".ok.npy"))
    shutil.rmtree(folder)
    return ok


def shard_shingles(task: dict) -> dict:
    """The sorted, unique shingle hashes of the needed documents of one shard: OUT.npy (concatenated)
    and OUT.index.npy (document, start, end)."""
    import pyarrow.parquet as pq

    cfg = PipelineConfig.from_dict(task["config"])
    out = Path(task["out"])
    need = np.load(task["need"]).tolist()
    texts = pq.read_table(Path(cfg.work) / "prep" / task["source"] / f"{task['shard']}.parquet",
                          columns=["text"])["text"].to_pylist()
    sets, index, at = [], [], 0
    for i in range(0, len(need), SKETCH_BATCH):
        hashes, c = batch_shingle_hashes([texts[d] for d in need[i:i + SKETCH_BATCH]], cfg.dedup.params)
        for d, h in zip(need[i:i + SKETCH_BATCH], np.split(hashes, np.cumsum(c)[:-1])):
            h = np.unique(h)
            sets.append(h), index.append((d, at, at + len(h)))
            at += len(h)
    np.save(f"{out}.npy", np.concatenate(sets))
    np.save(f"{out}.index.npy", np.array(index, dtype=np.int64))
    return {"docs": len(need)}


def verify_pairs(task: dict) -> dict:
    """Exact Jaccard of one block of pairs between two shards (local document indices)."""
    def load(path: str):
        index = np.load(f"{path}.index.npy")
        return np.load(f"{path}.npy", mmap_mode="r"), dict(zip(index[:, 0].tolist(), index[:, 1:].tolist()))

    (sa, ia), (sb, ib) = load(task["a"]), load(task["b"])
    pairs = np.load(task["pairs"])
    ok = np.empty(pairs.shape[1], dtype=bool)
    for k, (u, v) in enumerate(pairs.T.tolist()):
        a, b = sa[slice(*ia[u])], sb[slice(*ib[v])]
        both = len(np.intersect1d(a, b, assume_unique=True))
        union = len(a) + len(b) - both
        ok[k] = (both / union if union else 1.0) >= task["threshold"]
    np.save(task["pairs"].replace(".npy", ".ok.npy"), ok)
    return {"pairs": len(ok)}


# ---------------------------------------------------------------- 3. select, classify, tokenize

def select_shard(task: dict) -> dict:
    import pyarrow.parquet as pq

    cfg = PipelineConfig.from_dict(task["config"])
    src, name = task["source"], task["shard"]
    folder = Path(cfg.work) / "select" / src
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"{name}.json"
    if marker.exists():
        return read_json(marker)
    table = pq.read_table(Path(cfg.work) / "prep" / src / f"{name}.parquet")
    texts = table["text"].to_pylist()
    tokens = table["tokens"].to_numpy() if "tokens" in table.column_names else None
    stages = {}
    if "dedup" in cfg.stages:
        t0, before = time.perf_counter(), _counts(texts, tokens)
        keep = np.load(Path(cfg.work) / "dedup" / src / f"{name}.keep.npy")
        texts, tokens = [t for t, k in zip(texts, keep) if k], tokens[keep] if tokens is not None else None
        stages["dedup"] = _stage(before, _counts(texts, tokens), time.perf_counter() - t0)
    if "classify" in cfg.stages and (not cfg.classify.sources or src in cfg.classify.sources):
        t0, before = time.perf_counter(), _counts(texts, tokens)
        keep = _classify(cfg, texts)
        texts, tokens = [t for t, k in zip(texts, keep) if k], tokens[keep] if tokens is not None else None
        stages["classify"] = _stage(before, _counts(texts, tokens), time.perf_counter() - t0)
    t0, before = time.perf_counter(), _counts(texts, tokens)
    if "tokenize" in cfg.stages:
        n_tokens = _tokenize(cfg, texts, Path(cfg.work) / "tokens" / src / name)
        stages["tokenize"] = _stage(before, _counts(texts, None) | {"tokens": n_tokens}, time.perf_counter() - t0)
    else:
        _write_documents(texts, Path(cfg.out) / src / f"{name}.jsonl.zst")
        stages["write"] = _stage(before, _counts(texts, tokens), time.perf_counter() - t0)
    result = {"source": src, "shard": name, "docs": len(texts), "stages": stages}
    write_json(marker, result)
    return result


def _classify(cfg: PipelineConfig, texts: list[str]) -> np.ndarray:
    from .classify import load_classifier

    key = ("clf", cfg.classify.model)
    if key not in _CACHE:
        _CACHE[key] = load_classifier(cfg.classify.model)
    keep = [np.zeros(0, dtype=bool)]
    for i in range(0, len(texts), cfg.classify.batch_size):
        labels, scores = _CACHE[key].predict(texts[i:i + cfg.classify.batch_size])
        keep.append(cfg.classify.keeps(labels, scores))
    return np.concatenate(keep)


def _tokenize(cfg: PipelineConfig, texts: list[str], path: Path) -> int:
    """One token shard (`zamba2.train.data` format) at path.bin / path.docs.npy; returns its token count."""
    from ..train.data import prepare

    if not any(texts):
        return 0
    tmp = path.parent / f"{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    meta = prepare(texts, tmp, _tokenizer(cfg), shard_tokens=2**62)  # one shard per work shard
    os.replace(tmp / "shard-00000.bin", path.with_suffix(".bin"))
    os.replace(tmp / "shard-00000.docs.npy", path.with_suffix(".docs.npy"))
    shutil.rmtree(tmp)
    return meta["tokens"]


def _write_documents(texts: list[str], path: Path) -> None:
    import zstandard

    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
