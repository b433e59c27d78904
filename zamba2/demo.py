"""`zamba2 demo`: the whole pipeline on a corpus every Python ships, on CPU, with no download.

The corpus is the Python documentation's topic pages (`pydoc_data.topics`, about 120k tokens),
tokenized with the Mistral v0.1 tokenizer from mistral-common. A small Zamba2 (every feature of the
real ones: Mamba2 layers, a shared attention block with RoPE and adapters) trains for a few minutes;
the demo reports validation perplexity against a unigram baseline, saves a checkpoint that
zamba2.load and transformers read, and generates a sample from it. The checkpoint carries its tokenizer and a
chat template (the built-in one), so `zamba2 chat --model runs/demo/checkpoint` and `zamba2 serve` run it as they
run a Hub model (the model is pretrained on documentation, not tuned to chat: expect text, not answers).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import torch

from .model.checkpoint import load
from .model.score import IGNORE
from .train.data import prepare
from .infer.generate import generate
from .text.chat import save_tokenizer
from .text.tokenizer import load_tokenizer
from .train.trainer import Trainer, TrainConfig, evaluate

DEMO_MODEL = dict(vocab_size=32000, hidden_size=128, num_hidden_layers=6,
                  layers_block_type=["mamba", "mamba", "hybrid", "mamba", "mamba", "hybrid"], intermediate_size=256,
                  num_attention_heads=4, num_mem_blocks=1, adapter_rank=16, mamba_d_state=32, n_mamba_heads=4,
                  mamba_ngroups=1, chunk_size=64, max_position_embeddings=2048)


def unigram_loss(trainer: Trainer, batches: int) -> float:
    """Cross-entropy of add-one-smoothed training-token frequencies on the validation targets."""
    data, split = trainer.train_loader.data, trainer.train_loader.hi
    counts = Counter(data.tokens(0, split).tolist())
    vocab, total = trainer.model.config.vocab_size, split
    loader = trainer.val_loader
    loader.load_state_dict({"pos": loader.lo})
    nll, n = 0.0, 0
    for _ in range(batches):
        labels = loader.next_batch()["labels"].flatten().tolist()
        for t in labels:
            if t != IGNORE:
                nll -= math.log((counts.get(t, 0) + 1) / (total + vocab))
                n += 1
    return nll / n


def demo(out: str | Path = "runs/demo", steps: int = 150, seed: int = 0) -> dict:
    import pydoc_data.topics

    out = Path(out)
    print(f"writing to {out.resolve()}: the prepared corpus (data/), the checkpoint (checkpoint/), metrics.jsonl")
    tok = load_tokenizer()
    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    meta = prepare(docs, out / "data", tok)
    print(f"corpus: {meta['docs']} documents, {meta['tokens']:,} tokens (Python's pydoc topics, Mistral tokenizer)")
    cfg = TrainConfig(data=str(out / "data"), out=str(out), model="tiny", model_overrides=DEMO_MODEL, seq_len=256,
                      batch_size=8, steps=steps, lr=4e-3, warmup_steps=steps // 10, decay_fraction=0.3,
                      weight_decay=0.1, val_fraction=0.1, eval_every=max(steps // 3, 1), eval_batches=4,
                      save_every=steps, log_every=10, seed=seed)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    trainer = Trainer(cfg)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    print(f"model: Zamba2 with {n_params / 1e6:.1f}M parameters; training {steps} steps of "
          f"{cfg.batch_size}x{cfg.seq_len} tokens on {trainer.device.type.upper()} in "
          f"{'bfloat16 mixed precision' if trainer.dtype == torch.bfloat16 else 'float32'}")
    t0 = time.time()
    trainer.run()
    minutes = (time.time() - t0) / 60
    val = evaluate(trainer, cfg.eval_batches)
    base = unigram_loss(trainer, cfg.eval_batches)
    print(f"trained in {minutes:.1f} min; validation perplexity {math.exp(val):.1f} "
          f"(unigram baseline {math.exp(base):.1f})")
    save_tokenizer(tok, out / "checkpoint")
    model = load(out / "checkpoint")
    prompt = "The for statement"
    ids = torch.tensor([tok.encode(prompt)])
    sample = generate(model, ids, max_new_tokens=48, temperature=0.7, top_k=40, seed=seed,
                      eos_token_id=tok.eos_id)
    text = tok.decode(sample[0].tolist())
    print(f"checkpoint: {out / 'checkpoint'} (try: zamba2 chat --model {out / 'checkpoint'})\nsample:\n{text}")
    return {"val_ppl": math.exp(val), "unigram_ppl": math.exp(base), "minutes": minutes, "sample": text}
