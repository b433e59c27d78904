"""The one reader (text/read.py): every format and compression, malformed records counted and skipped, clear
errors; the pipeline's chunks of it."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from zamba2.pipeline.read import chunks
from zamba2.text.read import expand, parse_lines, read_documents, records

LINES = [json.dumps({"text": f"document {i}"}) for i in range(5)]
BAD = ["not json", json.dumps({"other": "x"}), json.dumps({"text": 3}), "[1, 2]", ""]


def write(path, lines):
    data = ("\n".join(lines) + "\n").encode()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.json.zst"])
def test_jsonl_any_compression_skips_bad_lines(tmp_path, name):
    path = write(tmp_path / name, LINES[:2] + BAD + LINES[2:])
    stats = {}
    texts = list(records(path, stats=stats))
    assert [t for t in texts if t is not None] == [f"document {i}" for i in range(5)]
    assert stats["bad_lines"] == 4 and texts.count(None) == 4      # blank lines are not records


def test_parquet_and_txt(tmp_path):
    pq.write_table(pa.table({"body": ["one", None, "three"]}), tmp_path / "a.parquet")
    stats = {}
    assert list(records(str(tmp_path / "a.parquet"), "body", stats)) == ["one", None, "three"]
    assert stats["bad_lines"] == 1
    with pytest.raises(ValueError, match="no column 'text'"):
        list(records(str(tmp_path / "a.parquet")))
    (tmp_path / "b.txt").write_bytes("a whole file\nis one document \xff".encode("latin-1"))
    assert list(records(str(tmp_path / "b.txt"))) == ["a whole file\nis one document \ufffd"]


def test_chunks_count_records_not_documents(tmp_path):
    path = write(tmp_path / "a.jsonl", LINES[:3] + ["bad"] + LINES[3:])   # 6 records
    assert [(i, len(t), bad) for i, t, bad in chunks(path, "text", 4)] == [(0, 3, 1), (1, 2, 0)]
    (tmp_path / "empty.jsonl").write_text("")
    assert list(chunks(str(tmp_path / "empty.jsonl"), "text", 4)) == [(0, [], 0)]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no input files match"):
        expand([str(tmp_path / "*.jsonl")])
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="unknown format .csv"):
        expand([str(tmp_path / "a.csv")])
    good = zstandard.ZstdCompressor().compress(("\n".join(LINES * 200) + "\n").encode())
    (tmp_path / "cut.jsonl.zst").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="cut.jsonl.zst: unreadable"):
        list(records(str(tmp_path / "cut.jsonl.zst")))
    good = gzip.compress(("\n".join(LINES * 200) + "\n").encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="unreadable"):
        list(records(str(tmp_path / "cut.jsonl.gz")))
    # garbage in the middle of a stream (zlib.error, not an OSError): the rest of the file is lost, so it stops
    middle = len(good) // 2
    (tmp_path / "mid.jsonl.gz").write_bytes(good[:middle] + b"\xff" * 64 + good[middle + 64:])
    with pytest.raises(ValueError, match="mid.jsonl.gz: unreadable"):
        list(records(str(tmp_path / "mid.jsonl.gz")))


def test_a_binary_txt_file_is_a_bad_record(tmp_path):
    (tmp_path / "a.txt").write_bytes(bytes(range(256)) * 8)
    stats = {}
    assert list(records(str(tmp_path / "a.txt"), stats=stats)) == [None] and stats["bad_lines"] == 1


def test_read_documents_reads_what_the_pipeline_reads(tmp_path):
    """`zamba2 prepare` and `eval perplexity` take compressed JSONL and Parquet too; a named binary file is an error."""
    pq.write_table(pa.table({"text": ["from parquet", None]}), tmp_path / "a.parquet")
    paths = [write(tmp_path / "a.jsonl.zst", LINES[:2] + ["bad"]), tmp_path / "a.parquet", tmp_path / "b.md"]
    (tmp_path / "b.md").write_text("any other name is a text file")
    stats = {}
    assert list(read_documents(paths, stats=stats)) == ["document 0", "document 1", "from parquet",
                                                         "any other name is a text file"]
    assert stats["bad_lines"] == 2
    (tmp_path / "random.bin").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="random.bin: not a text file"):
        list(read_documents([tmp_path / "random.bin"]))
    with pytest.raises(FileNotFoundError, match="no such input file"):
        list(read_documents([tmp_path / "missing.jsonl"]))


def test_parse_lines_counts_and_yields_malformed_lines(tmp_path):
    path = write(tmp_path / "a.jsonl.gz", ["1", "x", "", "3"])
    stats = {}
    parse = lambda line: int(line) if line.strip().isdigit() else None  # noqa: E731
    assert list(parse_lines(path, parse, stats)) == [1, None, 3] and stats["bad_lines"] == 1
