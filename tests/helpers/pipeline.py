"""Helpers for the pipeline tests: write a generated corpus as sources in several formats."""

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

FORMATS = ("jsonl.zst", "parquet", "jsonl.gz", "jsonl")


def write_sources(corpus, root: Path, bad_lines: int = 0, files_per_source: int = 2) -> list[dict]:
    """Source k of the corpus as `files_per_source` files of format FORMATS[k % 4]; `bad_lines` broken
    JSONL lines go into every JSONL file. Returns the [[source]] tables."""
    root.mkdir(parents=True, exist_ok=True)
    sources = []
    for k in range(max(corpus.source) + 1):
        texts = [t for t, s in zip(corpus.texts, corpus.source) if s == k]
        fmt = FORMATS[k % len(FORMATS)]
        for f in range(files_per_source):
            part, path = texts[f::files_per_source], root / f"s{k}-{f}.{fmt}"
            if fmt == "parquet":
                pq.write_table(pa.table({"text": part}), path)
                continue
            lines = [json.dumps({"text": t}) for t in part] + ["{broken"] * bad_lines
            data = ("\n".join(lines) + "\n").encode()
            path.write_bytes(zstandard.ZstdCompressor().compress(data) if fmt.endswith("zst")
                             else gzip.compress(data) if fmt.endswith("gz") else data)
        sources.append({"name": f"s{k}", "paths": [str(root / f"s{k}-*.{fmt}")]})
    return sources


def shard_texts(work: Path, source_names: list[str]) -> list[str]:
    """Texts of the work shards in the pipeline's document order (sources, then shard names)."""
    texts = []
    for name in source_names:
        for path in sorted((Path(work) / "prep" / name).glob("*.parquet")):
            texts += pq.read_table(path)["text"].to_pylist()
    return texts


def clusters(work: Path, corpus, source_names):
    """(cluster label, true origin, source index) of every document that reached dedup."""
    texts = shard_texts(work, source_names)
    origin = dict(zip(corpus.texts, corpus.origin))
    source = {name: i for i, name in enumerate(source_names)}
    src = []
    for name in source_names:
        for path in sorted((Path(work) / "prep" / name).glob("*.parquet")):
            src += [source[name]] * pq.read_metadata(path).num_rows
    return np.load(Path(work) / "dedup" / "clusters.npy"), np.array([origin[t] for t in texts]), np.array(src)


def tiny_classifier():
    """A "module:factory" classifier for the tests."""
    from zamba2.pipeline import HashedLogistic

    return HashedLogistic(["Low", "High"]).fit(["good text here"] * 2 + ["spam spam"] * 2, ["High"] * 2 + ["Low"] * 2)


def token_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("shard-*"))}


def counts(report) -> dict:
    """A report's per-source lines without the timings."""
    return {s: {st: {k: v for k, v in line.items() if k != "seconds"} for st, line in stages.items()}
            for s, stages in report["sources"].items()}
