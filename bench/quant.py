"""What bfloat16, int8 and int4 weights cost in accuracy, and what they buy in decode speed, on a trained model.

    zamba2 demo --out runs/demo                     # a trained checkpoint (or use any real one)
    python bench/quant.py --model runs/demo/checkpoint [--data FILE.txt|.jsonl] [--windows 8]

Perplexity is measured on real text: by default the documents the demo holds out for validation (the last
10% of Python's pydoc topics), cut into 512-token windows. Logit error is ||logits - logits_fp32|| /
||logits_fp32|| over all positions; top-1 agreement is how often the argmax matches float32's. 'decoded' is
the perplexity of the first window fed a token at a time through the cache: the decode path, whose int4
GEMV rounds its inputs to int8 per group. Decode is
64 greedy tokens after a 128-token prompt at batch 1, timed from the first new token to the last. int4 is
measured with groups of 32, 64 and 128 weights per scale and offset (`zamba2.quantize_int4(model, group_size)`),
and first the relative error ||W_q - W|| / ||W|| over all projections and the embedding of that asymmetric
format (min and max of a group map to 0 and 15) beside a symmetric one (scale absmax / 7.5, levels -8..7, no
offset), which is what decided for the offset.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F

import zamba2
from zamba2.infer.step import decode_step
from zamba2.ops.layers import Int4Linear, Linear
from zamba2.text.read import read_documents

WINDOW = 512


def text_windows(args, tok) -> torch.Tensor:
    if args.data:
        docs = list(read_documents([args.data]))
    else:
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        docs = [topics[k] for k in sorted(topics)]
        docs = docs[len(docs) - max(1, round(0.1 * len(docs))):]  # the demo's validation documents
    ids = [t for d in docs for t in [tok.bos_id] + tok.encode(d) + [tok.eos_id]]
    n = min(args.windows, len(ids) // WINDOW)
    return torch.tensor(ids[:n * WINDOW]).view(n, WINDOW)


@torch.inference_mode()
def score(model, windows: torch.Tensor) -> tuple[float, torch.Tensor]:
    logits = torch.cat([model(w[None]).float() for w in windows])  # [n, WINDOW, vocab]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
    return math.exp(nll.item()), logits


@torch.inference_mode()
def decoded_ppl(model, window: torch.Tensor) -> float:
    """Perplexity of one window fed a token at a time through the cache: the decode path, whose compiled int4
    GEMV rounds its inputs to int8 per group where the full forward's matmul does not."""
    cache = model.new_cache(batch_size=1)
    logits = torch.stack([decode_step(model, t[None], cache)[0].float() for t in window[:-1]])  # [WINDOW - 1, vocab]
    return math.exp(F.cross_entropy(logits, window[1:]).item())


def decode_rate(model) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    zamba2.generate(model, ids, 2)
    times = []
    for new in (1, 65):
        t0 = time.perf_counter()
        zamba2.generate(model, ids, new)
        times.append(time.perf_counter() - t0)
    return 64 / (times[1] - times[0])


def symmetric_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    """w quantized to int4 levels -8..7 with a bfloat16 scale per group and no offset, dequantized."""
    n, k = w.shape
    g = w.view(n, k // group, group)
    s = (g.abs().amax(-1) / 7.5).clamp(min=1e-12).bfloat16().float()[..., None]
    return ((g / s).round().clamp(-8, 7) * s).view(n, k)


def weight_errors(model) -> None:
    ws = [m.weight.detach() for m in model.modules() if isinstance(m, Linear) and m.in_features % 128 == 0]
    ws.append(model.embed_tokens.weight.detach())
    norm = sum(w.pow(2).sum() for w in ws).sqrt()
    for g in (32, 64, 128):
        asym = sum((Int4Linear.quantize(w, None, g).dequantize(0, len(w)) - w).pow(2).sum() for w in ws).sqrt()
        sym = sum((symmetric_int4(w, g) - w).pow(2).sum() for w in ws).sqrt()
        print(f"int4 groups of {g}: weight error {asym / norm:.2e} with an offset per group, {sym / norm:.2e} without")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder")
    ap.add_argument("--data", default=None, help="text or JSONL file (default: the demo's validation topics)")
    ap.add_argument("--windows", type=int, default=8, help="512-token windows to score")
    args = ap.parse_args()
    tok = zamba2.load_tokenizer(args.model)
    windows = text_windows(args, tok)
    base = zamba2.load(args.model)
    weight_errors(base)
    variants = {"float32": base, "bfloat16": copy.deepcopy(base).to(torch.bfloat16),
                "int8": zamba2.quantize_int8(copy.deepcopy(base)),
                **{f"int4 g{g}": zamba2.quantize_int4(copy.deepcopy(base), g) for g in (32, 64, 128)}}
    print(f"{args.model}: {windows.numel():,} tokens of text in {len(windows)} windows")
    print("(decoded: the first window a token at a time through the cache)")
    print(f"{'weights':9s} {'ppl':>8s} {'d ppl':>7s} {'decoded':>8s} {'d ppl':>7s} {'logit err':>10s} "
          f"{'top-1 agree':>12s} {'decode tok/s':>13s} {'x fp32':>7s}")
    ref = None
    for name, model in variants.items():
        ppl, logits = score(model, windows)
        dppl, rate = decoded_ppl(model, windows[0]), decode_rate(model)
        if ref is None:
            ref = ppl, dppl, logits, rate
        err = ((logits - ref[2]).norm() / ref[2].norm()).item()
        agree = (logits.argmax(-1) == ref[2].argmax(-1)).float().mean().item()
        print(f"{name:9s} {ppl:8.2f} {100 * (ppl / ref[0] - 1):+6.2f}% {dppl:8.2f} {100 * (dppl / ref[1] - 1):+6.2f}% "
              f"{err:10.2e} {100 * agree:11.2f}% {rate:13.1f} {rate / ref[3]:6.2f}x")


if __name__ == "__main__":
    main()
