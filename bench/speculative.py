"""Speculative decoding against plain decoding, batch 1, in one run: tokens/s and accepted tokens per step.

    python bench/speculative.py [--model CKPT] [--preset 1.2b] [--new 64] [--skip-preset]

Cases, each greedy (so every case must print the plain tokens, which the script checks):
- `--model CKPT` (a trained checkpoint, e.g. `zamba2 demo`'s runs/demo/checkpoint): drafted by its own int8 copy
  (zamba2.quantize_int8) on a prompt of its training text, and by prompt lookup on a repetitive prompt (that text
  twice: the continuation is in the prompt);
- a `--preset` shape with random weights (default 1.2b, Zamba2-1.2B's shape), drafted by its int8 copy and by
  prompt lookup on a repeated prompt.
Each drafter runs with k fixed (--k) and adaptive (the default of zamba2.generate). Decode tokens/s are timed from
the first new token to the last (the prefill excluded), plain decoding measured in the same run just before.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import zamba2
from zamba2.infer import speculative


def decode(model, ids: torch.Tensor, new: int, **kw) -> tuple[list[int], float, dict]:
    """(tokens, decode tokens/s from the first new token to the last, speculative stats)."""
    stats: dict = {}
    if "draft" in kw:
        it = speculative.stream(model, ids, new, kw["draft"], kw["k"], 0.0, None, None, set(), None, None, None, stats)
    else:
        it = zamba2.stream(model, ids, new)
    tokens, times = [], []
    for token in it:
        tokens.append(int(token[0]))
        times.append(time.perf_counter())
    return tokens, (len(tokens) - 1) / (times[-1] - times[0]), stats


def run_case(name: str, model, ids: torch.Tensor, drafts: dict, new: int, k: int) -> None:
    decode(model, ids[:, :16], 4)  # warm-up: kernels loaded, compiled decoder built
    plain, plain_rate, _ = decode(model, ids, new)
    print(f"\n{name}: prompt {ids.shape[1]} tokens, {new} new (plain decode {plain_rate:.2f} tok/s)")
    print(f"  {'drafter':28s} {'k':>8s} {'accepted':>9s} {'tokens/step':>12s} {'tok/s':>8s} {'x plain':>8s}")
    for label, draft in drafts.items():
        for kk in (k, None):
            tokens, rate, s = decode(model, ids, new, draft=draft, k=kk)
            same = "" if tokens == plain else "  (tokens differ from plain!)"
            accepted = s["accepted"] / s["proposed"] if s["proposed"] else float("nan")
            print(f"  {label:28s} {str(kk) if kk else 'adaptive':>8s} {100 * accepted:8.0f}% "
                  f"{(len(tokens) - 1) / s['steps']:12.2f} {rate:8.2f} {rate / plain_rate:7.2f}x{same}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a trained checkpoint (e.g. runs/demo/checkpoint)")
    ap.add_argument("--preset", default="1.2b", help="random-weight shape drafted by its int8 copy (default 1.2b)")
    ap.add_argument("--skip-preset", action="store_true", help="only the --model cases")
    ap.add_argument("--new", type=int, default=64, help="new tokens per generation (default 64)")
    ap.add_argument("--k", type=int, default=4, help="the fixed number of proposals (default 4)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.model:
        import pydoc_data.topics

        model = zamba2.load(args.model).eval()
        tok = zamba2.load_tokenizer(args.model)
        text = pydoc_data.topics.topics["for"][:1200]  # a page of the demo's training text
        ids = tok.encode(text)[:200]
        free = torch.tensor([[tok.bos_id] + ids[:100]])
        repeated = torch.tensor([[tok.bos_id] + ids + ids[:100]])  # the text again: its continuation is above
        draft = zamba2.quantize_int8(copy.deepcopy(model))
        run_case(f"{args.model} (trained), free", model, free, {"int8 copy": draft, "prompt lookup": "prompt-lookup"},
                 args.new, args.k)
        run_case(f"{args.model} (trained), repeated text", model, repeated,
                 {"int8 copy": draft, "prompt lookup": "prompt-lookup"}, args.new, args.k)
        del model, draft
    if not args.skip_preset:
        model = zamba2.Zamba2LM(zamba2.preset(args.preset)).eval()
        draft = zamba2.quantize_int8(copy.deepcopy(model))
        gen = torch.Generator().manual_seed(0)
        free = torch.randint(3, model.config.vocab_size, (1, 128), generator=gen)
        piece = torch.randint(3, model.config.vocab_size, (1, 64), generator=gen)
        repeated = torch.cat([piece, piece], 1)
        run_case(f"{args.preset} shape (random weights), free", model, free, {"int8 copy": draft}, args.new, args.k)
        run_case(f"{args.preset} shape (random weights), repeated prompt", model, repeated,
                 {"int8 copy": draft, "prompt lookup": "prompt-lookup"}, args.new, args.k)


if __name__ == "__main__":
    main()
