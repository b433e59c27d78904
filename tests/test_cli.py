"""The command line, run as a user runs it (a real subprocess)."""

import subprocess
import sys

import pytest
import torch

import zamba2
from conftest import random_model


def run(*args):
    return subprocess.run([sys.executable, "-m", "zamba2", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0 and "generate" in out.stdout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "ckpt"
    random_model(zamba2.tiny(vocab_size=32000, max_position_embeddings=256)).save(path)  # Mistral vocabulary
    return path


def test_generate_streams_a_continuation(checkpoint):
    out = run("generate", "--model", str(checkpoint), "--prompt", "The capital of France is",
              "--max-new-tokens", "8", "--ignore-eos")
    assert out.returncode == 0, out.stderr
    # the printed text is what the library produces for the same prompt
    tok = zamba2.load_tokenizer(checkpoint)
    ids = tok.encode("The capital of France is")
    expected = zamba2.generate(zamba2.load(checkpoint), torch.tensor([ids]), 8)[0, len(ids):]
    assert out.stdout.rstrip("\n") == tok.decode(ids + expected.tolist())[len(tok.decode(ids)):]


def test_generate_sampling_flags_and_bfloat16(checkpoint):
    out = run("generate", "--model", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "5",
              "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--seed", "1", "--dtype", "bfloat16")
    assert out.returncode == 0, out.stderr
    out = run("generate", "--model", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "5", "--int8")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr


def test_bad_input_gives_a_message_not_a_traceback(checkpoint, tmp_path):
    out = run("generate", "--model", str(tmp_path), "--prompt", "x")
    assert out.returncode == 2 and "no config.json" in out.stderr and "Traceback" not in out.stderr
    out = run("generate", "--model", str(checkpoint), "--prompt", "x", "--max-new-tokens", "1000")
    assert out.returncode == 2 and "context length" in out.stderr


def test_prepare_train_and_demo_commands(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(f'{{"text": "line {i} of some text to learn"}}' for i in range(80))
                                      + "\nnot json\n")
    out = run("prepare", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "data"))
    assert out.returncode == 0 and "80 documents" in out.stdout and "skipped 1 malformed" in out.stdout
    (tmp_path / "run.toml").write_text('[train]\nseq_len = 32\nbatch_size = 2\nwarmup_steps = 1\nsave_every = 2\n'
                                       '[model]\nvocab_size = 32000\n')
    out = run("train", "--config", str(tmp_path / "run.toml"), "--data", str(tmp_path / "data"),
              "--out", str(tmp_path / "run"), "--steps", "3")
    assert out.returncode == 0, out.stderr
    assert zamba2.load(tmp_path / "run" / "checkpoint").config.vocab_size == 32000
    out = run("demo", "--out", str(tmp_path / "demo"), "--steps", "4")
    assert out.returncode == 0, out.stderr
    assert "validation perplexity" in out.stdout and "unigram baseline" in out.stdout and "sample:" in out.stdout
