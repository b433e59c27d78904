"""The one document reader: JSONL, Parquet and plain-text files, gzip- or zstd-compressed or not.

Used by `zamba2 prepare`, `zamba2 eval perplexity` and the data pipeline (pipeline/read.py cuts its
records into chunks), and its line loop by the chat and preference data of fine-tuning.

A record is one JSONL line, one Parquet row or one whole .txt file. Bad records (broken JSON, a missing
or non-string text field, a binary .txt file inside a glob) are counted in stats["bad_lines"] and
skipped, never fatal. A compressed file that is corrupt or truncated stops with one line naming it: what
follows the damage cannot be read, and skipping it would silently drop the rest of the file.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from ..errors import UserError

FORMATS = (".jsonl", ".json", ".parquet", ".txt")
T = TypeVar("T")


def jsonl_text(line: str, text_key: str) -> str | None:
    """The text of one JSONL line; None when the line is malformed (bad JSON, missing or non-string text)."""
    try:
        text = json.loads(line)[text_key]
    except (json.JSONDecodeError, KeyError, TypeError, IndexError):
        return None
    return text if isinstance(text, str) else None


def decode_text(data: bytes) -> str | None:
    """The text of a file's bytes; None when they are not text: a NUL byte (no text format has one; most
    binary files do) or more than a tenth of the characters not UTF-8 (random bytes give about half). A few bad
    bytes in a text are replaced, not fatal."""
    if b"\0" in data:
        return None
    text = data.decode("utf-8", errors="replace")
    return None if text.count("\ufffd") > len(text) // 10 else text


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


def file_format(path: str | Path, strict: bool = True) -> tuple[str, str | None]:
    """(format, compression) from the file name, e.g. 'a.jsonl.zst' -> ('.jsonl', 'zst'). An unknown format is
    an error, or with strict=False read as .txt (a file given by name: text unless its bytes say otherwise)."""
    p = Path(path)
    compression = p.suffix[1:] if p.suffix in (".gz", ".zst") else None
    fmt = Path(p.stem).suffix if compression else p.suffix
    if fmt not in FORMATS and not strict:
        fmt = ".txt"
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


def parse_lines(path: str | Path, parse: Callable[[str], T | None], stats: dict | None = None) -> Iterator[T | None]:
    """parse(line) for each non-blank line of a text file (.gz / .zst decompressed); None is a malformed line,
    counted in stats['bad_lines'] and yielded (the pipeline counts records, callers that don't skip it)."""
    stats = stats if stats is not None else {}
    stats.setdefault("bad_lines", 0)
    _, compression = file_format(path, strict=False)
    with _unreadable_is_an_error(path), _open_binary(str(path), compression) as raw:
        for line in io.TextIOWrapper(raw, encoding="utf-8", errors="replace"):
            if not line.strip():
                continue
            value = parse(line)
            if value is None:
                stats["bad_lines"] += 1
            yield value


def records(path: str | Path, text_key: str = "text", stats: dict | None = None,
            strict: bool = True) -> Iterator[str | None]:
    """The text of each record of a file, or None for a bad record (counted in stats['bad_lines'])."""
    fmt, compression = file_format(path, strict)
    stats = stats if stats is not None else {}
    stats.setdefault("bad_lines", 0)
    if fmt == ".jsonl":
        yield from parse_lines(path, lambda line: jsonl_text(line, text_key), stats)
        return
    with _unreadable_is_an_error(path):
        if fmt == ".parquet":
            yield from _parquet(str(path), text_key, stats)
            return
        with _open_binary(str(path), compression) as raw:
            text = decode_text(raw.read())
        if text is None:  # a binary file among the text files
            stats["bad_lines"] += 1
        yield text


def read_documents(paths: Iterable[str | Path], text_key: str = "text", stats: dict | None = None) -> Iterator[str]:
    """Documents from files given by name: .txt (one per file), .jsonl (one per line, under `text_key`) or
    .parquet (one per row), each optionally .gz / .zst; any other name is read as .txt.

    A file that is not text is an error here (it was named, not globbed); broken JSONL lines and rows are
    skipped and counted in stats["bad_lines"].
    """
    stats = stats if stats is not None else {}
    stats.setdefault("bad_lines", 0)
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such input file: {path}")
        if path.is_dir():
            raise UserError(f"{path} is a directory; give the files in it (e.g. {path}/*.jsonl)")
        is_txt = file_format(path, strict=False)[0] == ".txt"
        for text in records(path, text_key, stats, strict=False):
            if text is None and is_txt:
                raise UserError(f"{path}: not a text file (NUL bytes or mostly invalid UTF-8); expected .txt (UTF-8), "
                                ".jsonl or .parquet")
            if text is not None:
                yield text


@contextmanager
def _unreadable_is_an_error(path):
    """A truncated or corrupt compressed stream (or Parquet file) becomes one UserError naming the file."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as e:
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
