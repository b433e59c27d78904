"""Run report: documents, tokens and characters in and out per source and stage, duplicates within and
across sources, filter rules, time per stage (JSON + a printed table). Also the progress bar."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

STAGE_ORDER = ("read", "normalize", "filter", "sketch", "dedup", "classify", "tokenize", "write")


def progress(items: Iterable, total: int, desc: str) -> Iterator:
    """Yields items, drawing `desc [####    ] k/total  elapsed` on stderr when it is a terminal."""
    show = bool(desc) and sys.stderr.isatty()
    start = time.perf_counter()
    for k, item in enumerate(items, 1):
        if show:
            done = int(30 * k / max(total, 1))
            sys.stderr.write(f"\r{desc:<16} [{'#' * done}{' ' * (30 - done)}] {k}/{total} "
                             f"{time.perf_counter() - start:6.1f}s")
            sys.stderr.flush()
        yield item
    if show:
        sys.stderr.write("\n")


def merge_shards(shard_stats: list[dict]) -> dict:
    """Sum per-shard stage lines into {source: {stage: line}} (rule counts summed too)."""
    out: dict = {}
    for shard in shard_stats:
        per_stage = out.setdefault(shard["source"], {})
        for stage, line in shard["stages"].items():
            total = per_stage.setdefault(stage, {})
            for key, value in line.items():
                if isinstance(value, dict):
                    sub = total.setdefault(key, {})
                    for k, v in value.items():
                        sub[k] = sub.get(k, 0) + v
                else:
                    total[key] = round(total.get(key, 0) + value, 4)
    return {src: dict(sorted(stages.items(), key=lambda kv: STAGE_ORDER.index(kv[0])))
            for src, stages in out.items()}


def table(report: dict) -> str:
    """The report as text."""
    rows = [("source", "stage", "docs in", "docs out", "tokens in", "tokens out", "chars out", "cpu s")]
    for src, stages in report["sources"].items():
        for stage, line in stages.items():
            if stage == "sketch":
                continue
            rows.append((src, stage, f"{line.get('docs_in', '-'):,}", f"{line.get('docs_out', '-'):,}",
                         _num(line.get("tokens_in")), _num(line.get("tokens_out")), _num(line.get("chars_out")),
                         f"{line.get('seconds', 0):.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    for src, stages in report["sources"].items():
        rules = {k: v for k, v in stages.get("filter", {}).get("rules", {}).items() if v}
        if rules:
            lines.append(f"filter rules fired ({src}): " + ", ".join(f"{k} {v:,}" for k, v in rules.items()))
    d = report.get("dedup")
    if d:
        lines.append(f"dedup ({d['mode']}): {d['clusters']:,} clusters, {d['candidate_pairs']:,} candidate pairs"
                     + (f" ({d['rejected_pairs']:,} rejected by exact Jaccard)" if d["rejected_pairs"] else ""))
        for src, s in d["sources"].items():
            lines.append(f"  {src}: removed {s['exact_duplicates']:,} exact + {s['near_duplicates']:,} near "
                         f"duplicates ({s['within_source']:,} within the source, {s['across_sources']:,} across)")
    lines.append("wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in report["wall_seconds"].items()))
    return "\n".join(lines)


def _num(v) -> str:
    return "-" if v is None else f"{v:,}"
