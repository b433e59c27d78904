"""Data pipeline benchmark: documents/s per stage, MinHash against datasketch, and a filter + dedup run.

    PYTHONPATH=. python bench/pipeline.py          # 20k documents, a few minutes on 2 cores (or pip install -e .)
    python bench/pipeline.py --docs 1000000        # the 1M-document run (corpus cached in --corpus)

1. Per stage, in this process on one core: read (JSONL.zst), normalize, filter, MinHash (zyda1, zyda2),
   LSH + union-find, tokenize (Mistral v0.1).
2. MinHash against datasketch on the same shingles and 128 permutations: documents/s from text to
   signature for both, and each one's Jaccard estimates against the exact Jaccard of planted pairs.
3. `zamba2.pipeline.run` (normalize + filter + dedup, zyda1) over the generated corpus with the process
   executor: wall time, documents/s, peak RSS (this process and the largest worker), and precision and
   recall of the duplicate clusters against the planted truth.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from zamba2.pipeline import PRESETS, Filter, MinHasher, PipelineConfig, run
from zamba2.pipeline.dedup import components, star_edges
from zamba2.pipeline.minhash import estimate_jaccard, shingle_strings
from zamba2.pipeline.normalize import normalize
from zamba2.pipeline.read import records
from zamba2.pipeline.stages import sketch
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the helpers tests and bench share
from helpers.synthetic import Generator, pair_scores

SOURCES = 3


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def make_corpus(folder: Path, n_docs: int, files_per_source: int, seed: int = 0) -> Path:
    """Writes the corpus as JSONL.zst files, streaming (never all in memory), plus origins.npz: the planted
    truth as (text digest, origin). Reused when it already exists with the same size."""
    import zstandard

    stamp = folder / "corpus.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {"docs": n_docs, "seed": seed}:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    gen = Generator(seed)
    writers = [[zstandard.ZstdCompressor(level=1).stream_writer(open(folder / f"s{s}-{f:03d}.jsonl.zst", "wb"))
                for f in range(files_per_source)] for s in range(SOURCES)]
    digests, origins, done, k = [], [], 0, 0
    while done < n_docs:
        c = gen.corpus(min(10_000, n_docs - done), n_sources=SOURCES)
        for text, src, origin in zip(c.texts, c.source, c.origin):
            writers[src][k % files_per_source].write((json.dumps({"text": text}) + "\n").encode())
            digests.append(digest(normalize(text))), origins.append(origin + done)
            k += 1
        done += len(c.texts)
    for w in (w for ws in writers for w in ws):
        w.close()
    np.savez(folder / "origins.npz", digest=np.frombuffer(b"".join(digests), dtype=np.uint64),
             origin=np.array(origins, dtype=np.int64))
    stamp.write_text(json.dumps({"docs": n_docs, "seed": seed}))
    return folder


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>10,.0f} docs/s"


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def stage_rates(corpus: Path, n: int) -> None:
    print(f"\n## Stages, one core, {n:,} documents")
    path = str(sorted(corpus.glob("s0-*.jsonl.zst"))[0])
    texts, t = timed(lambda: [r for _, r in zip(range(n), records(path)) if r])
    n = len(texts)
    print(f"read (JSONL.zst)      {rate(n, t)}")
    normal, t = timed(lambda: [normalize(x) for x in texts])
    print(f"normalize             {rate(n, t)}")
    flt = Filter()
    _, t = timed(lambda: [flt.fired(r, x) for r, x in zip(texts, normal)])
    print(f"filter (17 rules)     {rate(n, t)}")
    for preset in ("zyda1", "zyda2"):
        hasher = MinHasher(PRESETS[preset])
        _, t = timed(hasher.signatures, normal)
        print(f"minhash {preset}         {rate(n, t)}")
    keys, t_sketch = timed(sketch, normal, MinHasher(PRESETS["zyda1"]))
    t0 = time.perf_counter()
    edges = [star_edges(row) for row in keys]
    components(n, np.concatenate([e[0] for e in edges]), np.concatenate([e[1] for e in edges]))
    print(f"sketch + LSH + union-find (zyda1) {rate(n, t_sketch + time.perf_counter() - t0)}")
    from zamba2.text.tokenizer import load_tokenizer

    tok = load_tokenizer()
    _, t = timed(lambda: [tok.encode(x) for x in normal])
    print(f"tokenize (Mistral v0.1) {rate(n, t)}")


def versus_datasketch(corpus_seed: int, n: int) -> None:
    from datasketch import MinHash

    print(f"\n## MinHash vs datasketch (128 permutations, same shingles), {n:,} documents, one core")
    gen = Generator(corpus_seed + 1)
    texts = [gen.document() for _ in range(n)]
    for preset in ("zyda1", "zyda2"):
        params = PRESETS[preset]
        hasher = MinHasher(params)
        _, ours = timed(hasher.signatures, texts)
        t_shingles = t_update = 0.0
        for text in texts:
            t0 = time.perf_counter()
            shingles = [s.encode() for s in shingle_strings(text, params)]
            t1 = time.perf_counter()
            m = MinHash(num_perm=params.num_perm)
            m.update_batch(shingles)
            t_update += time.perf_counter() - t1
            t_shingles += t1 - t0
        theirs = t_shingles + t_update
        print(f"{preset} ({params.ngram} {params.n}-grams): ours {rate(n, ours)}, datasketch {rate(n, theirs)} "
              f"({rate(n, t_update).strip()} without making shingle strings): {theirs / ours:.1f}x")

    # Jaccard estimates on planted near-duplicate pairs spanning J = 0.1 .. 1
    params = PRESETS["zyda1"]
    hasher = MinHasher(params)
    rows = []
    for k in range(300):
        a = gen.document((150, 250))
        b = gen.variant(a, "edit", edit_words=k % 25)
        sa, sb = shingle_strings(a, params), shingle_strings(b, params)
        exact = len(sa & sb) / len(sa | sb)
        ma, mb = MinHash(num_perm=128), MinHash(num_perm=128)
        ma.update_batch([s.encode() for s in sa]), mb.update_batch([s.encode() for s in sb])
        sig = hasher.signatures([a, b])
        rows.append((exact, estimate_jaccard(sig[0], sig[1]), ma.jaccard(mb)))
    exact, ours, theirs = np.array(rows).T
    sd = np.sqrt(exact * (1 - exact) / 128)
    print(f"Jaccard on {len(rows)} pairs (exact J from {exact.min():.2f} to {exact.max():.2f}; "
          f"binomial sd sqrt(J(1-J)/128) has RMS {np.sqrt(np.mean(sd**2)):.4f}):")
    for name, est in (("ours", ours), ("datasketch", theirs)):
        err = est - exact
        print(f"  {name:<11} bias {err.mean():+.4f}  RMS error {np.sqrt(np.mean(err**2)):.4f}  "
              f"within 3 sd {np.mean(np.abs(err) <= 3 * sd + 1e-9):.1%}")


def pipeline_run(corpus: Path, out: Path, workers: int, shard_docs: int, verify: bool) -> None:
    print(f"\n## normalize + filter + dedup (zyda1{', verified' if verify else ''}) with {workers} worker processes")
    shutil.rmtree(out, ignore_errors=True)
    cfg = PipelineConfig.from_dict({
        "source": [{"name": f"s{s}", "paths": [str(corpus / f"s{s}-*.jsonl.zst")]} for s in range(SOURCES)],
        "stages": ["normalize", "filter", "dedup"], "work": str(out / "work"), "out": str(out / "docs"),
        "executor": "processes", "workers": workers, "shard_docs": shard_docs, "dedup": {"verify": verify}})
    report, seconds = timed(run, cfg, False)
    n = sum(s["read"]["docs_in"] for s in report["sources"].values())
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    from zamba2.pipeline.report import table

    print(table(report))
    print(f"total: {n:,} documents in {seconds:.1f} s = {rate(n, seconds).strip()} on {workers} workers; "
          f"peak RSS: driver {self_rss:.2f} GiB, largest worker {child_rss:.2f} GiB")

    truth = np.load(corpus / "origins.npz")
    order = np.argsort(truth["digest"])
    sorted_digest = truth["digest"][order]
    import pyarrow.parquet as pq

    origin = []
    for s in range(SOURCES):
        for path in sorted((out / "work" / "prep" / f"s{s}").glob("*.parquet")):
            d = np.frombuffer(b"".join(digest(t) for t in pq.read_table(path)["text"].to_pylist()),
                              dtype=np.uint64)
            origin.append(truth["origin"][order[np.searchsorted(sorted_digest, d)]])
    origin = np.concatenate(origin)
    labels = np.load(out / "work" / "dedup" / "clusters.npy")
    keep = np.concatenate([np.load(p) for s in range(SOURCES)
                           for p in sorted((out / "work" / "dedup" / f"s{s}").glob("*.keep.npy"))])
    precision, recall = pair_scores(labels, origin)
    # removals: right when a kept document has the same origin (the content survives)
    kept_origins = np.zeros(origin.max() + 1, dtype=bool)
    kept_origins[origin[keep]] = True
    right = int(kept_origins[origin[~keep]].sum())
    should = len(origin) - len(np.unique(origin))
    print(f"dedup against the planted duplicates: cluster pairs precision {precision:.4f} recall {recall:.4f}; "
          f"removed documents precision {right / max((~keep).sum(), 1):.4f} recall {right / max(should, 1):.4f} "
          f"({int((~keep).sum()):,} removed, {should:,} planted)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=20_000, help="documents in the generated corpus (default 20000)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for the pipeline run (default 2)")
    p.add_argument("--shard-docs", type=int, default=50_000, help="documents per work shard (default 50000)")
    p.add_argument("--sample", type=int, default=5_000, help="documents for the per-stage rates (default 5000)")
    p.add_argument("--versus", type=int, default=2_000, help="documents for the datasketch comparison")
    p.add_argument("--corpus", default="/tmp/zamba2-bench/corpus", help="where the corpus is generated and kept")
    p.add_argument("--out", default="/tmp/zamba2-bench/run", help="work folder of the pipeline run")
    p.add_argument("--verify", action="store_true", help="dedup checks candidate pairs by exact Jaccard")
    p.add_argument("--skip", nargs="*", default=[], choices=("stages", "versus", "run"), help="parts to skip")
    args = p.parse_args()

    corpus, t = timed(make_corpus, Path(args.corpus), args.docs, max(2 * args.workers, args.docs // 100_000))
    print(f"corpus: {args.docs:,} documents in {SOURCES} sources at {corpus} ({t:.0f} s to generate or check)")
    if "stages" not in args.skip:
        stage_rates(corpus, args.sample)
    if "versus" not in args.skip:
        versus_datasketch(0, args.versus)
    if "run" not in args.skip:
        pipeline_run(corpus, Path(args.out), args.workers, args.shard_docs, args.verify)


if __name__ == "__main__":
    main()
