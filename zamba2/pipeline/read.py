"""Readers: documents from JSONL, Parquet and plain-text files, gzip- or zstd-compressed or not.

A record is one JSONL line, one Parquet row or one whole .txt file. Records are read in chunks of
`shard_docs`, so memory is bounded by the chunk size, and chunk k of a file always holds the same
records: a resumed run skips finished chunks by record count. Bad records (broken JSON, a missing or
non-string text field, a binary .txt file) are counted and skipped, never fatal. A compressed file
that is corrupt or truncated stops the run with one line naming it: what follows the damage cannot be
read, and skipping it would silently drop the rest of the file (and shift the chunks a resume counts).
"""

from __future__ import annotations

import glob
import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError
from ..train.data import decode_text, jsonl_text

FORMATS = (".jsonl", ".json", ".parquet", ".txt")


def expand(patterns: list[str]) -> list[str]:
    """Files matching the glob patterns, sorted; a pattern matching nothing is an error."""
    files = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern, recursive=True))
        if not found:
            raise FileNotFoundError(f"no input files match {pattern}")
        files += [f for f in found if Path(f).is_file()]
    for f in files:
        file_format(f)
    return files


def file_format(path: str) -> tuple[str, str | None]:
    """(format, compression) from the file name, e.g. 'a.jsonl.zst' -> ('.jsonl', 'zst')."""
    p = Path(path)
    compression = p.suffix[1:] if p.suffix in (".gz", ".zst") else None
    fmt = Path(p.stem).suffix if compression else p.suffix
    if fmt not in FORMATS:
        raise UserError(f"{path}: unknown format {fmt or '(none)'}; expected {', '.join(FORMATS)} "
                         "(optionally .gz or .zst)")
    if fmt == ".parquet" and compression:
        raise UserError(f"{path}: Parquet compresses internally; don't wrap it in .{compression}")
    return (".jsonl" if fmt == ".json" else fmt), compression


def _open_binary(path: str, compression: str | None):
    if compression == "gz":
        return gzip.open(path, "rb")
    if compression == "zst":
        return io.BufferedReader(_ZstdReader(path), 1 << 20)
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """Decompresses a .zst file of one or more frames, and, unlike zstandard's stream_reader, says so
    when the file ends inside a frame (a truncated download) instead of returning a short text."""

    def __init__(self, path: str):
        import zstandard

        self._new = zstandard.ZstdDecompressor().decompressobj
        self._file, self._dec, self._buf, self._fed = open(path, "rb"), self._new(), b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, out) -> int:
        while not self._buf:
            rest = b""
            if self._dec.eof:  # a frame ended: what follows it is the next frame
                rest, self._dec, self._fed = self._dec.unused_data, self._new(), False
            chunk = rest or self._file.read(1 << 20)
            if not chunk:
                if self._fed:
                    raise EOFError("the compressed stream ends inside a frame")
                return 0
            self._fed = True
            self._buf = self._dec.decompress(chunk)
        n = min(len(out), len(self._buf))
        out[:n], self._buf = self._buf[:n], self._buf[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def records(path: str, text_key: str = "text", stats: dict | None = None) -> Iterator[str | None]:
    """The text of each record of a file, or None for a bad record (counted in stats['bad_lines'])."""
    fmt, compression = file_format(path)
    stats = stats if stats is not None else {}
    stats.setdefault("bad_lines", 0)
    try:
        if fmt == ".parquet":
            yield from _parquet(path, text_key, stats)
            return
        with _open_binary(path, compression) as raw:
            if fmt == ".txt":
                text = decode_text(raw.read())
                if text is None:  # a binary file among the text files
                    stats["bad_lines"] += 1
                yield text
                return
            for line in io.TextIOWrapper(raw, encoding="utf-8", errors="replace"):
                if not line.strip():
                    continue
                text = jsonl_text(line, text_key)
                if text is None:
                    stats["bad_lines"] += 1
                yield text
    except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt compressed stream
        raise UserError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    except Exception as e:
        if type(e).__module__.startswith(("zstandard", "pyarrow")):
            raise UserError(f"{path}: unreadable ({e})") from None
        raise


def _parquet(path: str, text_key: str, stats: dict) -> Iterator[str | None]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    if text_key not in f.schema_arrow.names:
        raise UserError(f"{path}: no column {text_key!r} (columns: {', '.join(f.schema_arrow.names)})")
    for batch in f.iter_batches(columns=[text_key], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                stats["bad_lines"] += 1
            yield text if isinstance(text, str) else None


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
