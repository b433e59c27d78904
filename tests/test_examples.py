"""The files a newcomer copies (examples/) are valid and run: the pipeline on a small generated corpus, then
training on its shards (the run shortened to a tiny model and a few short steps)."""

import json
import os
import random
import re
import shutil
import subprocess
import sys

import zamba2
from helpers.process import ROOT
from zamba2.pipeline import PipelineConfig
from zamba2.train.trainer import TrainConfig

EXAMPLES = ROOT / "examples"


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "zamba2", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_example_configs_are_valid_as_shipped():
    cfg = TrainConfig.from_toml(EXAMPLES / "run.toml")
    assert cfg.model == "small" and cfg.model_overrides["vocab_size"] == 32000
    pipeline = PipelineConfig.from_toml(EXAMPLES / "pipeline.toml")
    assert [s.name for s in pipeline.sources] == ["web", "books"] and pipeline.stages[-1] == "tokenize"


def test_the_pipeline_then_the_run(tmp_path):
    # the repository's layout in a temporary folder: examples/ with raw/ beside the TOML, runs/ beside examples/
    examples = tmp_path / "examples"
    shutil.copytree(EXAMPLES, examples)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(500)]
    for source in ("web", "books"):
        (examples / "raw" / source).mkdir(parents=True)
        docs = [{"text": " ".join(rng.choice(words) for _ in range(80)) + "."} for _ in range(40)]
        (examples / "raw" / source / "part-0.jsonl").write_text("\n".join(map(json.dumps, docs)) + "\n")
    out = run("data", "run", "examples/pipeline.toml", "--executor", "serial", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    # shortened: the shipped batch (8 x 1024 tokens, 4 micro-batches) is far more than a test's corpus and CPU
    toml = (examples / "run.toml").read_text()
    for key, value in (("seq_len", 64), ("batch_size", 2), ("grad_accum", 1), ("warmup_steps", 1)):
        toml = re.sub(rf"(?m)^{key} = \d+", f"{key} = {value}", toml)
    (examples / "run.toml").write_text(toml)
    out = run("train", "--config", "examples/run.toml", "--model", "tiny", "--steps", "2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert zamba2.load(tmp_path / "runs" / "example" / "checkpoint").config.vocab_size == 32000
