"""The command line, run as a user runs it (a real subprocess)."""

import gzip
import json
import random
import subprocess
import sys

import pytest
import torch

import zamba2
from conftest import random_model
from zamba2.__main__ import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "zamba2", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0 and "generate" in out.stdout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "ckpt"
    zamba2.save(random_model(zamba2.tiny(vocab_size=32000, max_position_embeddings=256)), path)  # Mistral vocabulary
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
    out = run("generate", "--model", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "5", "--int4")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr


def test_quantize_writes_a_folder_every_command_loads(checkpoint, tmp_path):
    out = run("quantize", "--model", str(checkpoint), "--out", str(tmp_path / "q"), "--bits", "4", "--group-size", "32")
    assert out.returncode == 0 and "int4 weights (groups of 32)" in out.stdout, out.stderr
    out = run("generate", "--model", str(tmp_path / "q"), "--prompt", "Hello", "--max-new-tokens", "5")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    out = run("generate", "--model", str(tmp_path / "q"), "--prompt", "Hello", "--int8")
    assert out.returncode == 2 and "holds int4 weights already" in out.stderr


def test_generate_with_a_draft_or_prompt_lookup_prints_the_same_text(checkpoint):
    plain = run("generate", "--model", str(checkpoint), "--prompt", "a b c a b c a b", "--max-new-tokens", "8",
                "--ignore-eos")
    assert plain.returncode == 0, plain.stderr
    for flags in (["--prompt-lookup"], ["--draft", str(checkpoint), "--draft-int8", "--num-speculative", "3"]):
        out = run("generate", "--model", str(checkpoint), "--prompt", "a b c a b c a b", "--max-new-tokens", "8",
                  "--ignore-eos", *flags)
        assert out.returncode == 0 and out.stdout == plain.stdout, out.stderr


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
    assert out.stdout.startswith(f"writing to {tmp_path / 'demo'}")
    assert "validation perplexity" in out.stdout and "unigram baseline" in out.stdout and "sample:" in out.stdout
    # the checkpoint carries its tokenizer and a chat template: `zamba2 chat` runs it as it runs a Hub model
    checkpoint = tmp_path / "demo" / "checkpoint"
    assert {"tokenizer.model", "tokenizer_config.json"} <= {f.name for f in checkpoint.iterdir()}
    out = subprocess.run([sys.executable, "-m", "zamba2", "chat", "--model", str(checkpoint), "--max-new-tokens", "3"],
                         input="Hello\n", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.endswith("\n") and out.stderr == "", out.stderr  # 4 steps: any text


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, checkpoint):
    """One folder of bad inputs: checkpoints with a bad config.json field, bad tokenizer files, binary
    data, run TOMLs with bad [train] / [model] fields, a broken pipeline TOML and a corrupt gzip file."""
    root = tmp_path_factory.mktemp("bad")
    config = json.loads((checkpoint / "config.json").read_text())
    for name, value in [("hidden_size", -128), ("hidden_size", "128"), ("hidden_size", 0),
                        ("num_attention_heads", 0), ("n_mamba_heads", 0), ("eos_token_id", "two")]:
        folder = root / f"{name}={value}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, name: value}))
    zamba2.save(random_model(), root / "vocab128")  # tiny's 128-token vocabulary, no tokenizer: Mistral's 32000 is too big
    (root / "tokenizer.json").write_text('{"model": 1}')
    (root / "tokenizer.model").write_bytes(random.Random(0).randbytes(3000))
    (root / "random.bin").write_bytes(random.Random(1).randbytes(20000))
    (root / "docs").mkdir()
    for i, body in enumerate(['steps = "two"', 'lr = "fast"', "seq_len = [64]", 'dtype = "float23"',
                              "batch_size = 2.5", "batch_size = 0", "steps = -5", "[model]\nhiden_size = 64"]):
        (root / f"run{i}.toml").write_text(f'[train]\ndata = "data"\n{body}\n')
    (root / "pipeline.toml").write_text('[source]\nname = "a"\npaths = ["*.jsonl"]\n')
    data = gzip.compress(("\n".join(json.dumps({"text": f"document {i} " * 20}) for i in range(2000)) + "\n").encode())
    middle = len(data) // 2
    (root / "broken.jsonl.gz").write_bytes(data[:middle] + b"\xff" * 64 + data[middle + 64:])
    return root


def run_here(capsys, *args) -> tuple[int, str]:
    """The command line in this process (no interpreter start-up): exit status and stderr."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    return status, capsys.readouterr().err


BAD_INPUTS = [  # (what, command line with {root} and {ckpt}, words the one line must hold)
    ("config", "generate --model {root}/hidden_size=-128 --prompt x", "hidden_size = -128; expected a number > 0"),
    ("config", "generate --model {root}/hidden_size=128 --prompt x", "hidden_size = '128' is not an integer"),
    ("config", "generate --model {root}/hidden_size=0 --prompt x", "config.json: config: hidden_size = 0"),
    ("config", "generate --model {root}/num_attention_heads=0 --prompt x", "num_attention_heads = 0"),
    ("config", "generate --model {root}/n_mamba_heads=0 --prompt x", "n_mamba_heads = 0"),
    ("config", "generate --model {root}/eos_token_id=two --prompt x", "eos_token_id = 'two' is not"),
    ("sampling", "generate --model {ckpt} --prompt x --temperature nan", "temperature = nan"),
    ("sampling", "generate --model {ckpt} --prompt x --top-p 1.5", "top_p = 1.5"),
    ("sampling", f"generate --model {{ckpt}} --prompt x --temperature 1 --seed {2**64}", "seed = 18446744073709551616"),
    ("speculative", "generate --model {ckpt} --prompt x --prompt-lookup --num-speculative -1", "num_speculative = -1"),
    ("speculative", "generate --model {ckpt} --prompt x --num-speculative 2",
     "--num-speculative goes with --draft MODEL or --prompt-lookup"),
    ("device", "generate --model {ckpt} --prompt x --device banana", "device 'banana': expected cpu, cuda"),
    ("device", "generate --model {ckpt} --prompt x --device cuda:99", "CUDA GPU"),  # none here, or fewer than 100
    ("tokenizer", "prepare {root}/random.bin --out {root}/d --tokenizer {root}/tokenizer.json",
     "tokenizer.json: not a tokenizers JSON file"),
    ("tokenizer", "prepare {root}/random.bin --out {root}/d --tokenizer {root}/tokenizer.model",
     "tokenizer.model: not a SentencePiece model"),
    ("tokenizer", "generate --model {root}/vocab128 --prompt x", "tokenizer has 32000 tokens but the model only 128"),
    ("tokenizer", "eval perplexity --model {root}/vocab128 --data {root}/docs", "has 32000 tokens but the model only"),
    ("prepare", "prepare {root}/docs --out {root}/d", "docs is a directory"),
    ("prepare", "prepare {root}/random.bin --out {root}/d", "random.bin: not a text file"),
    ("train", "train --config {root}/run0.toml", "run0.toml: [train]: steps = 'two' is not an integer"),
    ("train", "train --config {root}/run1.toml", "lr = 'fast' is not a number"),
    ("train", "train --config {root}/run2.toml", "seq_len = [64] is not an integer"),
    ("train", "train --config {root}/run3.toml", "dtype = 'float23'; expected one of auto, float32, bfloat16"),
    ("train", "train --config {root}/run4.toml", "batch_size = 2.5 is not an integer"),
    ("train", "train --config {root}/run5.toml", "batch_size = 0; expected a number >= 1"),
    ("train", "train --config {root}/run6.toml", "steps = -5; expected a number >= 0"),
    ("train", "train --config {root}/run7.toml", "unknown Config field 'hiden_size' (did you mean 'hidden_size'?)"),
    ("pipeline", "data run {root}/pipeline.toml", "[source] is a single table; write each source as [[source]]"),
    ("pipeline", "data filter {root}/broken.jsonl.gz --out {root}/f", "broken.jsonl.gz: unreadable"),
]


@pytest.mark.parametrize("what, command, words", BAD_INPUTS, ids=[f"{w}-{i}" for i, (w, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_is_one_line_and_status_2(bad_files, checkpoint, capsys, what, command, words):
    status, err = run_here(capsys, *command.format(root=bad_files, ckpt=checkpoint).split())
    assert status == 2 and len(err.strip().splitlines()) == 1 and words in err, err


def test_bad_input_through_a_real_process(bad_files, checkpoint):
    """As a user meets it: the interpreter's own argv decoding (non-UTF-8 bytes), one line, no traceback."""
    out = subprocess.run([sys.executable, "-m", "zamba2", "generate", "--model", str(checkpoint), "--prompt",
                          b"caf\xe9"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "argument --prompt: not valid UTF-8 text (byte 0xe9" in out.stderr, out.stderr
    for command, words in [("train --config {root}/run1.toml", "lr = 'fast'"),
                           ("generate --model {root}/hidden_size=0 --prompt x", "hidden_size = 0")]:
        out = run(*command.format(root=bad_files).split())
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and words in out.stderr, out.stderr


def test_a_bug_keeps_its_traceback(checkpoint, monkeypatch):
    """Only bad input is shortened to one line: an error of ours still shows where it happened."""
    def broken(*a, **k):
        raise ValueError("a bug, not bad input")

    import zamba2.infer.load

    monkeypatch.setattr(zamba2.infer.load, "load", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["generate", "--model", str(checkpoint), "--prompt", "x"])
