"""Batching throughput of `zamba2 serve`: the same greedy requests one at a time, then all at once.

    python bench/serve_load.py [--model DIR | --preset small] [--requests 64] [--max-tokens 32] [--max-batch 16]

Starts a real server process on a loopback port (a random-weight model of the preset when no --model is
given), sends each request alone and waits for it, then sends them all concurrently, checks that every
concurrent answer equals the one it got alone, and reports generated tokens/s both ways and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

import zamba2
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the helpers tests and bench share
from helpers.process import start_server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: random weights of --preset)")
    p.add_argument("--preset", default="tiny", help="tiny (hidden 32) or small (45M parameters); Mistral vocabulary")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    args = p.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        model = f"{tmp.name}/model"
        zamba2.save(zamba2.Zamba2LM(zamba2.preset(args.preset, vocab_size=32000, max_position_embeddings=512)), model)
    proc, url = start_server(model, "bench", "--max-batch", str(args.max_batch))
    http = httpx.Client(timeout=600)
    prompts = [f"Request {i}: the story of" + " a long road" * (i % 9) for i in range(args.requests)]

    def send(prompt: str) -> tuple[str, int]:
        r = http.post(f"{url}/v1/completions", json={"model": "bench", "prompt": prompt, "max_tokens": args.max_tokens,
                                                     "temperature": 0, "ignore_eos": True}).json()
        return r["choices"][0]["text"], r["usage"]["completion_tokens"]

    try:
        send(prompts[0])  # warm-up
        t0 = time.perf_counter()
        alone = [send(q) for q in prompts]
        t_alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.requests) as pool:
            together = list(pool.map(send, prompts))
        t_together = time.perf_counter() - t0
        peak = http.get(f"{url}/health").json()["peak_batch"]
    finally:
        proc.terminate()
        proc.wait()
    tokens = sum(n for _, n in alone)
    same = sum(a == b for a, b in zip(alone, together))
    print(f"{args.requests} requests x {args.max_tokens} tokens, max batch {args.max_batch} (peak {peak}): "
          f"one at a time {tokens / t_alone:.0f} tok/s ({t_alone:.2f} s), concurrent {tokens / t_together:.0f} tok/s "
          f"({t_together:.2f} s): {t_alone / t_together:.1f}x; identical answers {same}/{args.requests}")


if __name__ == "__main__":
    main()
