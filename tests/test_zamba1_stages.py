"""A tiny Zamba1 checkpoint through every stage: the `generate` command, int8, the serving engine, perplexity,
training on packed documents, and LoRA fine-tuning that reaches the Mamba1 mixers and the shared block."""

import json
import queue
import subprocess
import sys

import pytest
import torch

import zamba2
from conftest import random_model
from zamba2.eval.perplexity import perplexity
from zamba2.infer.quant import quantize_checkpoint
from zamba2.model.zamba1_config import tiny
from zamba2.ops.layers import Int8Linear
from zamba2.serve.engine import Engine, Request
from zamba2.text.read import read_documents
from zamba2.train.data import prepare
from zamba2.train.lora import LoRALinear, LoRA, merge
from zamba2.train.trainer import Trainer, TrainConfig

TINY = dict(vocab_size=32000, max_position_embeddings=256)  # Mistral's vocabulary: the fallback tokenizer fits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("zamba1") / "ckpt"
    zamba2.save(random_model(tiny(**TINY)), path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return zamba2.load(checkpoint)


def test_generate_command(checkpoint, model):
    out = subprocess.run([sys.executable, "-m", "zamba2", "generate", "--model", str(checkpoint), "--prompt",
                          "The capital of France is", "--max-new-tokens", "8", "--ignore-eos"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    tok = zamba2.load_tokenizer(checkpoint)
    ids = tok.encode("The capital of France is")
    expected = zamba2.generate(model, torch.tensor([ids]), 8)[0, len(ids):]
    assert out.stdout.rstrip("\n") == tok.decode(ids + expected.tolist())[len(tok.decode(ids)):]


def test_int8_reaches_the_mamba1_projections_and_stays_close(checkpoint, model, tmp_path):
    q = quantize_checkpoint(checkpoint, tmp_path / "q8", 8)
    assert all(isinstance(layer.mamba.in_proj, Int8Linear) and isinstance(layer.mamba.out_proj, Int8Linear)
               for layer in q.layers)
    assert isinstance(q.shared_blocks[0].feed_forward.gate_proj, Int8Linear)
    ids = torch.randint(3, 32000, (2, 19))
    with torch.no_grad():
        ref, out = model(ids), q(ids)
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 0.02
        assert torch.equal(zamba2.load(tmp_path / "q8")(ids), out)  # the written folder loads as quantized
    assert zamba2.generate(q, ids, 4).shape == (2, 23)


def test_serving_engine_gives_what_generate_gives(model):
    prompts = [[1, 50, 900, 7000, 12], [1, 3, 4]]  # mixed lengths, batched together
    finished = [queue.Queue() for _ in prompts]
    tokens = [[] for _ in prompts]

    def collect(i):
        def on_event(e):
            if e.token is not None:
                tokens[i].append(e.token)
            if e.finish:
                finished[i].put(e.finish)
        return on_event

    engine = Engine(model, max_batch=2).start()
    try:
        for i, p in enumerate(prompts):
            engine.submit(Request(p, 6, collect(i)))
        assert [f.get(timeout=60) for f in finished] == ["length", "length"]
    finally:
        engine.stop()
    for p, got in zip(prompts, tokens):
        assert got == zamba2.generate(model, torch.tensor([p]), 6)[0, len(p):].tolist()


def test_perplexity_equals_the_forward(checkpoint, model):
    tok = zamba2.load_tokenizer(checkpoint)
    text = "The river ran quietly past the old mill, where the wheel had not turned for forty years."
    r = perplexity(model, tok, [text], window=64, stride=32)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
    assert r["tokens"] == ids.shape[1] - 1 and r["perplexity"] == pytest.approx(nll.exp().item(), rel=1e-4)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    lines = [json.dumps({"text": f"Document {i}: " + "the quick brown fox jumps over the lazy dog " * (i % 5 + 1)})
             for i in range(40)]
    (root / "docs.jsonl").write_text("\n".join(lines))
    prepare(read_documents([root / "docs.jsonl"]), root / "shards", zamba2.load_tokenizer(), shard_tokens=500)
    return root / "shards"


def test_packed_documents_are_isolated(model):
    """doc_ids reset the Mamba1 state and conv and restrict attention: each document equals itself alone."""
    ids = torch.randint(3, 32000, (1, 30))
    doc = torch.tensor([[0] * 11 + [1] * 3 + [2] * 16])
    with torch.no_grad():
        packed = model(ids, doc_ids=doc)
        for a, b in ((0, 11), (11, 14), (14, 30)):
            alone = model(ids[:, a:b])
            assert ((packed[:, a:b] - alone).abs().max() / alone.abs().max()).item() < 1e-5


@pytest.mark.parametrize("start", ["checkpoint", "preset"])
def test_training_a_few_steps(checkpoint, data_dir, tmp_path, start):
    model = dict(model=str(checkpoint)) if start == "checkpoint" else dict(model="zamba1-tiny", model_overrides=TINY)
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "run"), seq_len=64, batch_size=2, steps=3,
                      warmup_steps=1, eval_every=100, save_every=100, log_every=1, device="cpu", dtype="float32",
                      **model)
    losses = Trainer(cfg).run()
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    trained = zamba2.load(tmp_path / "run" / "checkpoint")
    assert isinstance(trained, zamba2.Zamba1LM)


def test_lora_training_a_few_steps(checkpoint, data_dir, tmp_path):
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "run"), model=str(checkpoint), seq_len=64,
                      batch_size=2, steps=2, warmup_steps=1, eval_every=100, save_every=100, log_every=1,
                      device="cpu", dtype="float32")
    trainer = Trainer(cfg, lora=LoRA(rank=2))
    assert all(isinstance(layer.mamba.in_proj, LoRALinear) for layer in trainer.model.layers)
    losses = trainer.run()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_lora_reaches_mixers_and_shared_block_and_merges(checkpoint):
    model = zamba2.load(checkpoint)
    lora = LoRA(rank=2, base_dtype="float32")
    lora.apply(model)
    wrapped = {n.rsplit(".", 1)[1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {"in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj"}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()  # a trained adapter
        ids = torch.randint(3, 32000, (2, 12))
        out = model(ids)
        merged = merge(model)
        assert isinstance(merged, zamba2.Zamba1LM)
        assert ((merged(ids) - out).abs().max() / out.abs().max()).item() < 1e-4
