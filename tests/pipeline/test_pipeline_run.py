"""The whole pipeline: a TOML with every stage over mixed formats -> token shards `zamba2 train` reads;
the report; resuming after a crash; the process executor; the command line; the classifier."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.pipeline import counts, token_files, write_sources

from zamba2.train.data import TokenData
from zamba2.pipeline import ClassifyConfig, HashedLogistic, PipelineConfig, load_classifier, run
from zamba2.pipeline import runner
from zamba2.pipeline.normalize import normalize
from helpers.synthetic import Generator
from zamba2.text.tokenizer import load_tokenizer


def junk(gen):
    """Documents the heuristic filters remove, and low-quality ones for the classifier."""
    filtered = ["Too short.", "<?xml version= " * 3 + gen.document(), "1234 5678 " * 40]
    spam = [" ".join(["buy cheap pills now click here free offer"] * 12) + " " + gen.paragraph(20)
            for _ in range(12)]
    return filtered, spam


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    gen = Generator(5)
    corpus = gen.corpus(400, n_sources=2)
    filtered, spam = junk(gen)
    junk_docs = [(t, s) for t in filtered for s in (0, 1)] + [(t, k % 2) for k, t in enumerate(spam[4:])]
    for text, s in junk_docs:  # filter junk in both sources, distinct spam in each
        corpus.texts.append(text), corpus.source.append(s), corpus.origin.append(-1), corpus.kind.append("junk")
    sources = write_sources(corpus, root / "raw", bad_lines=2)
    model = HashedLogistic(["Low", "High"]).fit([gen.document() for _ in range(40)] + spam[:4] * 10,
                                                ["High"] * 40 + ["Low"] * 40)
    model.save(root / "quality.npz")
    return root, corpus, sources, spam


def config(inputs, name, **over):
    root, _, sources, _ = inputs
    d = {"source": sources, "work": str(root / f"{name}.work"), "out": str(root / name), "shard_docs": 64,
         "stages": ["normalize", "filter", "dedup", "classify", "tokenize"], "count_tokens": True,
         "classify": {"model": str(root / "quality.npz"), "keep_labels": ["High"], "sources": ["s1"]}}
    return PipelineConfig.from_dict(d | over)


@pytest.fixture(scope="module")
def serial_run(inputs):
    cfg = config(inputs, "serial")
    return cfg, run(cfg, verbose=False)


def test_end_to_end_shards_and_report(inputs, serial_run):
    root, corpus, sources, spam = inputs
    cfg, report = serial_run
    data = TokenData(cfg.out)
    meta = data.meta
    assert meta["docs"] == report["output"]["docs"] == len(data.doc_starts) and data.num_tokens == meta["tokens"]
    assert meta["vocab_size"] == 32000 and meta["dtype"] == "uint16" and meta["bad_lines"] == 4

    # every output document decodes back to a normalized input text; no filter junk, no spam in s1
    tok = load_tokenizer()
    outputs = {"s0": set(), "s1": set()}
    for shard in meta["shards"]:
        starts = np.load(Path(cfg.out) / f"{shard['name']}.docs.npy")
        tokens = np.fromfile(Path(cfg.out) / f"{shard['name']}.bin", dtype=np.uint16)
        outputs[shard["source"]] |= {tok.decode(tokens[a:b].tolist()).strip() for a, b in zip(starts, starts[1:])}
    normalized = {normalize(t).strip() for t in corpus.texts}
    assert outputs["s0"] | outputs["s1"] <= normalized
    assert not any("<?xml" in o or "1234 5678" in o for o in outputs["s0"] | outputs["s1"])
    assert not any("click here" in o for o in outputs["s1"]) and any("click here" in o for o in outputs["s0"])

    s0, s1 = report["sources"]["s0"], report["sources"]["s1"]
    assert s0["read"]["bad_lines"] == 4 and s0["read"]["docs_in"] == s0["read"]["docs_out"] + 4  # 2 per JSONL file
    assert s0["filter"]["rules"]["min_length"] == 1 and s0["filter"]["rules"]["xml_declaration"] == 1
    assert s0["filter"]["rules"]["numerical"] == 1 and s0["filter"]["docs_in"] - s0["filter"]["docs_out"] == 3
    assert "classify" in s1 and "classify" not in s0                          # only where configured
    assert s1["classify"]["docs_in"] - s1["classify"]["docs_out"] >= 1         # the spam left in s1
    for src in (s0, s1):  # documents and tokens flow from stage to stage
        stages = [s for s in ("read", "normalize", "filter", "dedup", "classify", "tokenize") if s in src]
        for a, b in zip(stages, stages[1:]):
            assert src[a]["docs_out"] == src[b]["docs_in"]
            assert src[a]["tokens_out"] == src[b].get("tokens_in", src[b]["tokens_out"]), (a, b)
    assert sum(s["tokenize"]["tokens_out"] for s in report["sources"].values()) == meta["tokens"]
    assert json.loads((Path(cfg.work) / "report.json").read_text())["output"] == report["output"]
    assert set(report["wall_seconds"]) == {"read/filter", "dedup", "select/write"}


def test_report_table(serial_run, capsys):
    from zamba2.pipeline.report import table

    text = table(serial_run[1])
    assert "s0" in text and "tokenize" in text and "filter rules fired (s0)" in text and "within the source" in text


def test_resume_after_a_crash_gives_the_same_output(inputs, serial_run, monkeypatch):
    cfg = config(inputs, "crash")
    real, calls = runner.select_shard, []

    def crashing(task):
        calls.append(task)
        if len(calls) == 4:
            raise RuntimeError("worker died")
        return real(task)

    monkeypatch.setattr(runner, "select_shard", crashing)
    with pytest.raises(RuntimeError):
        run(cfg, verbose=False)
    monkeypatch.setattr(runner, "select_shard", real)
    prep = sorted(Path(cfg.work, "prep").rglob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in prep}
    report = run(cfg, verbose=False)
    assert {p: p.stat().st_mtime_ns for p in prep} == stamps    # finished shards were not redone
    assert token_files(cfg.out) == token_files(serial_run[0].out)
    assert report["output"] == serial_run[1]["output"] | {"folder": cfg.out}


def test_a_changed_config_is_not_resumed(inputs, serial_run):
    cfg = config(inputs, "serial", shard_docs=32)
    with pytest.raises(ValueError, match="different configuration"):
        run(cfg, verbose=False)


def test_process_executor_matches_serial(inputs, serial_run):
    cfg = config(inputs, "procs", executor="processes", workers=2)
    report = run(cfg, verbose=False)
    assert token_files(cfg.out) == token_files(serial_run[0].out)
    assert counts(report) == counts(serial_run[1])


def test_command_line(inputs, tmp_path):
    root, _, sources, _ = inputs
    toml = tmp_path / "pipeline.toml"
    toml.write_text('stages = ["filter", "dedup", "tokenize"]\nwork = "w"\nout = "data"\nshard_docs = 100\n'
                    + "".join(f'[[source]]\nname = "{s["name"]}"\npaths = {json.dumps(s["paths"])}\n' for s in sources)
                    + '[filter.mean_word_length]\nmax = 15\n[dedup]\npreset = "zyda2"\nmode = "cross-source-only"\n')
    cli = lambda *a: subprocess.run([sys.executable, "-m", "zamba2", "data", *a], capture_output=True, text=True,
                                    timeout=300)
    out = cli("run", str(toml))
    assert out.returncode == 0, out.stderr
    assert "docs in" in out.stdout and "cross-source-only" in out.stdout
    assert TokenData(tmp_path / "data").meta["docs"] > 0
    out = cli("filter", sources[0]["paths"][0], "--out", str(tmp_path / "f"))
    assert out.returncode == 0 and list((tmp_path / "f" / "input").glob("*.jsonl.zst"))
    out = cli("classify", str(tmp_path / "f/input/*.jsonl.zst"), "--out", str(tmp_path / "c"),
              "--model", str(root / "quality.npz"), "--keep-labels", "High")
    assert out.returncode == 0 and "classify" in out.stdout, out.stderr
    toml.write_text("stages = ['filter', 'sort']\n[[source]]\nname = 'a'\npaths = ['x.jsonl']\n")
    out = cli("run", str(toml))
    assert out.returncode == 2 and "unknown stage(s) ['sort']" in out.stderr and "Traceback" not in out.stderr
    out = cli("dedup", str(tmp_path / "nothing*.jsonl"), "--out", str(tmp_path / "d"))
    assert out.returncode == 2 and "no input files match" in out.stderr and "Traceback" not in out.stderr


def test_classifier_keeps_by_label_or_score(inputs):
    root, _, _, spam = inputs
    model = load_classifier(str(root / "quality.npz"))
    gen = Generator(9)
    labels, scores = model.predict([gen.document() for _ in range(5)] + spam[4:8])
    assert labels == ["High"] * 5 + ["Low"] * 4
    assert (scores[:5] > 0.5).all() and (scores[5:] < 0.5).all()     # score: expected label index
    assert ClassifyConfig("m", min_score=0.5).keeps(labels, scores).tolist() == [True] * 5 + [False] * 4
    assert ClassifyConfig("m", keep_labels=["Low"]).keeps(labels, scores).tolist() == [False] * 5 + [True] * 4
    with pytest.raises(ValueError, match="keep_labels and/or min_score"):
        ClassifyConfig("m")
    with pytest.raises(ValueError, match="no_such_module"):
        load_classifier("no_such_module:make")
    assert isinstance(load_classifier("helpers.pipeline:tiny_classifier"), HashedLogistic)   # module:factory


def test_the_same_toml_by_any_path_is_the_same_run(tmp_path, monkeypatch):
    """`paths` may be one glob as a string, and p.toml, $PWD/p.toml and sub/p.toml (from the parent folder)
    name one run: the work folder's fingerprint holds absolute paths, so each rerun resumes it."""
    from zamba2.__main__ import main

    folder = tmp_path / "sub"
    (folder / "raw").mkdir(parents=True)
    (folder / "raw" / "a.jsonl").write_text("".join(json.dumps({"text": f"Document {i}. " + "Some words here. " * 30})
                                                    + "\n" for i in range(20)))
    (folder / "p.toml").write_text('stages = ["normalize", "filter"]\n[[source]]\nname = "a"\npaths = "raw/*.jsonl"\n')
    monkeypatch.chdir(folder)
    assert main(["data", "run", "p.toml"]) == 0
    assert main(["data", "run", str(folder / "p.toml")]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["data", "run", "sub/p.toml"]) == 0
    report = json.loads((folder / "work" / "report.json").read_text())
    assert report["sources"]["a"]["read"]["docs_out"] == 20
