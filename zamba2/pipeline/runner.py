"""Run a pipeline: the stages of stages.py in order, on one executor, resumably, with a report.

    read/filter (a task per input file) -> dedup (a task per key row) -> select/tokenize (a task per
    shard) -> meta.json

The work folder remembers the configuration; resuming with a different one is refused, because
finished shards would no longer match it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from .config import PipelineConfig
from .executors import make_executor
from .read import expand
from .report import merge_shards, table
from .stages import _tokenizer, dedup_corpus, prepare_file, read_json, select_shard, write_json


def run(cfg: PipelineConfig, verbose: bool = True) -> dict:
    """Runs (or resumes) the pipeline; returns the report, also written to WORK/report.json."""
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    fingerprint = json.loads(json.dumps(cfg.fingerprint()))
    if (work / "config.json").exists() and read_json(work / "config.json") != fingerprint:
        raise UserError(f"{work} holds a run with a different configuration; delete it or use another work folder")
    write_json(work / "config.json", fingerprint)
    executor = make_executor(cfg.executor, cfg.workers, cfg.ray_address)
    config, wall = cfg.to_dict(), {}
    names = [s.name for s in cfg.sources]

    t0 = time.perf_counter()
    tasks = [{"config": config, "source": s.name, "file": f, "index": i}
             for s in cfg.sources for i, f in enumerate(expand(s.paths))]
    files = list(executor.map(prepare_file, tasks, "read/filter"))
    shards = sorted((sh for f in files for sh in f["shards"]), key=lambda s: (names.index(s["source"]), s["shard"]))
    wall["read/filter"] = time.perf_counter() - t0

    dedup = None
    if "dedup" in cfg.stages:
        t0 = time.perf_counter()
        dedup = dedup_corpus(cfg, shards, executor)
        wall["dedup"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tasks = [{"config": config, "source": s["source"], "shard": s["shard"]} for s in shards]
    selected = sorted(executor.map(select_shard, tasks, "select/write"),
                      key=lambda s: (names.index(s["source"]), s["shard"]))
    output = finalize_tokens(cfg, selected, shards) if "tokenize" in cfg.stages else {
        "documents": str(cfg.out), "docs": sum(s["docs"] for s in selected)}
    wall["select/write"] = time.perf_counter() - t0

    report = {"sources": merge_shards(shards + selected), "dedup": dedup, "output": output,
              "wall_seconds": {k: round(v, 3) for k, v in wall.items()}}
    write_json(work / "report.json", report)
    if verbose:
        print(table(report))
    return report


def finalize_tokens(cfg: PipelineConfig, selected: list[dict], shards: list[dict]) -> dict:
    """Gathers the per-shard token files into OUT as shard-NNNNN.* + meta.json (`zamba2.train.data` format).

    Shards alternate between sources (round robin), so a training run reading them in order sees the
    mix early instead of one source after another. Files are hard-linked, not copied, where possible.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*"):
        old.unlink()
    queues = [[s for s in selected if s["source"] == src.name and s["stages"]["tokenize"]["tokens_out"]]
              for src in cfg.sources]
    order = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    if not order:
        raise UserError("no documents left to tokenize after the pipeline's stages")
    tok = _tokenizer(cfg)
    entries = []
    for k, s in enumerate(order):
        src = Path(cfg.work) / "tokens" / s["source"] / s["shard"]
        name = f"shard-{k:05d}"
        for suffix in (".bin", ".docs.npy"):
            _link(src.with_suffix(suffix), out / f"{name}{suffix}")
        starts = np.load(out / f"{name}.docs.npy")
        entries.append({"name": name, "tokens": int(starts[-1]), "docs": len(starts) - 1, "source": s["source"]})
    meta = {"dtype": np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32).name,
            "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "tokenizer": str(tok.path),
            "shards": entries, "tokens": sum(e["tokens"] for e in entries), "docs": sum(e["docs"] for e in entries),
            "bad_lines": sum(s["stages"]["read"]["bad_lines"] for s in shards)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return {"tokens": meta["tokens"], "docs": meta["docs"], "shards": len(entries), "folder": str(out)}


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copyfile(src, dst)
