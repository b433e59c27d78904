"""The pipeline's reading: files by glob, and their records (text/read.py, the one reader) in chunks.

Records are read in chunks of `shard_docs`, so memory is bounded by the chunk size, and chunk k of a
file always holds the same records: a resumed run skips finished chunks by record count.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..text.read import expand, records  # noqa: F401 (expand: the runner's; records: bench/pipeline.py's)


def chunks(path: str, text_key: str, shard_docs: int) -> Iterator[tuple[int, list[str], int]]:
    """(chunk index, good texts, bad records) for every `shard_docs` records of a file."""
    index, texts, bad = 0, [], 0
    for text in records(path, text_key):
        if text is None:
            bad += 1
        else:
            texts.append(text)
        if len(texts) + bad == shard_docs:
            yield index, texts, bad
            index, texts, bad = index + 1, [], 0
    if texts or bad or index == 0:
        yield index, texts, bad
