"""Turn latency of `zamba2 chat` (a carried cache: each turn prefills only its new tokens) against re-prefilling the
whole history every turn (a chat that keeps no state), at turns 1, 10 and 30.

    python bench/chat.py --preset small [--turns 30] [--reply-tokens 32] [--dtype bfloat16] [--int8 | --int4]

Random weights (preset), the Mistral tokenizer and the built-in chat template; every reply is exactly
--reply-tokens long (no eos), every user message the same ~20-token sentence, so a turn adds the same number of
tokens whatever its index. Per measured turn it prints the conversation length, the carried turn's time to first
token (prefill of the new tokens) and whole latency (prefill + reply), the same for a stateless turn (prefill of
the whole history in a fresh cache + the same reply, zamba2.generate), and their ratio. The carried turn should
stay nearly flat with the history (attention over the longer KV cache is the only growth); the stateless one grows
with it.
"""

from __future__ import annotations

import argparse
import time

import torch

import zamba2
from zamba2.infer.chat import ChatSession
from zamba2.text.chat import chat_template

MESSAGE = "Tell me one more thing about the for statement in Python, and keep it short please."


def timed_turn(session: ChatSession) -> tuple[float, float]:
    """(time to first token, whole turn) in seconds for one carried turn."""
    t0 = time.perf_counter()
    first = None
    for _ in session.say(MESSAGE):
        first = first or time.perf_counter()
    return first - t0, time.perf_counter() - t0


def timed_stateless(model, prompt: list[int], reply_tokens: int) -> tuple[float, float]:
    """(time to first token, whole turn) for the same turn prefilled from nothing."""
    t0 = time.perf_counter()
    first = None
    for _ in zamba2.stream(model, torch.tensor([prompt]), reply_tokens):
        first = first or time.perf_counter()
    return first - t0, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model sizes (default small)")
    p.add_argument("--turns", type=int, default=30, help="conversation length in turns (default 30)")
    p.add_argument("--reply-tokens", type=int, default=32, help="tokens per reply (default 32)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--int8", action="store_true")
    q.add_argument("--int4", action="store_true")
    args = p.parse_args()

    torch.manual_seed(0)
    model = zamba2.Zamba2LM(zamba2.preset(args.preset, vocab_size=32000)).to(getattr(torch, args.dtype)).eval()
    if args.int8 or args.int4:
        model = zamba2.quantize_int8(model) if args.int8 else zamba2.quantize_int4(model)
    tok = zamba2.load_tokenizer()
    session = ChatSession(model, tok, chat_template(None, tok), max_new_tokens=args.reply_tokens)
    session.eos = []  # replies of exactly --reply-tokens
    zamba2.generate(model, [[1, 2, 3]], 4)  # first-call costs (kernels, compiled step) paid before timing

    measured = sorted({t for t in (1, 10, 30, args.turns) if t <= args.turns})
    print(f"{args.preset} ({args.dtype}{', int8' if args.int8 else ', int4' if args.int4 else ''}), "
          f"{args.reply_tokens}-token replies, {torch.get_num_threads()} threads")
    print(f"{'turn':>4} {'tokens':>6} {'new':>4} | {'carried ttft':>12} {'turn':>8} | {'stateless ttft':>14} "
          f"{'turn':>8} | {'ratio':>5}")
    for turn in range(1, args.turns + 1):
        before = len(session.ids)
        ttft, whole = timed_turn(session)
        if turn not in measured:
            continue
        prompt = session.ids[:len(session.ids) - len(session.reply)]
        s_ttft, s_whole = timed_stateless(model, prompt, args.reply_tokens)
        print(f"{turn:>4} {len(prompt):>6} {len(prompt) - before:>4} | {ttft * 1e3:>10.1f}ms {whole * 1e3:>6.0f}ms | "
              f"{s_ttft * 1e3:>12.1f}ms {s_whole * 1e3:>6.0f}ms | {s_whole / whole:>5.2f}")


if __name__ == "__main__":
    main()
