"""`zamba2 serve` under load, on a real server process on a loopback port (a random-weight model of the preset
when no --model is given). Three questions:

    python bench/serve_load.py [--model DIR | --preset small] [--requests 64] [--max-tokens 32] [--max-batch 16]

Batching: each request alone, then all at once; checks that every concurrent answer equals the one it got
alone, and reports generated tokens/s both ways and their ratio.

    python bench/serve_load.py --chat [--conversations 16 --turns 8 --max-tokens 24]

Prefix cache: concurrent multi-turn conversations (each turn's prompt is the whole conversation so far, ~1K
tokens by the last turn), once with the cache and once without (--prefix-cache-mb 0); checks that the answers
are equal and reports the last turn's time to first token both ways and the cache's hit rate.

    python bench/serve_load.py --arrivals --max-tokens 400 [--streams 8 --arrival-tokens 4096 --arrivals-count 4]

Chunked prefill: inter-token latency of running streams while long prompts arrive every second, against the
same streams alone, and the arriving prompts' time to first token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
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
    p.add_argument("--chat", action="store_true", help="multi-turn conversations with and without the prefix cache")
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--arrivals", action="store_true", help="long prompts arriving while streams decode")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--arrival-tokens", type=int, default=4096)
    p.add_argument("--arrivals-count", type=int, default=4, help="long prompts, one per second")
    p.add_argument("--prefill-chunk", type=int, default=None, help="the server's --prefill-chunk (default its own)")
    args = p.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        model = f"{tmp.name}/model"
        zamba2.save(zamba2.Zamba2LM(zamba2.preset(args.preset, vocab_size=32000, max_position_embeddings=8192)), model)
    flags = ["--max-batch", str(args.max_batch)]
    if args.prefill_chunk:
        flags += ["--prefill-chunk", str(args.prefill_chunk)]
    if args.chat:
        chat(model, flags, args)
    elif args.arrivals:
        arrivals(model, flags, args)
    else:
        batching(model, flags, args)


def batching(model: str, flags: list[str], args) -> None:
    proc, url = start_server(model, "bench", *flags)
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


def stream(http: httpx.Client, url: str, body: dict) -> tuple[str, list[float]]:
    """A streamed completion's text and the arrival time of each token (logprobs 0: one event per token)."""
    text, times = "", []
    with http.stream("POST", f"{url}/v1/completions", json={"model": "bench", "stream": True, "logprobs": 0,
                                                            **body}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices:
                    text += choices[0]["text"]
                    times += [time.perf_counter()] * len(choices[0]["logprobs"]["tokens"])
    return text, times


def metrics(http: httpx.Client, url: str) -> dict[str, float]:
    return {line.split()[0]: float(line.split()[1]) for line in http.get(f"{url}/metrics").text.splitlines()
            if line and not line.startswith("#") and "{" not in line}


def chat(model: str, flags: list[str], args) -> None:
    """Each conversation: a ~100-token user message per turn, the whole conversation resent as token ids."""
    tok = zamba2.load_tokenizer(model)
    words = "the river runs past old stone bridges and quiet towns while boats carry grain to the sea".split()
    messages = [[tok.encode(f"[INST] {c}.{t}: " + " ".join(words[(c + t + i) % len(words)] for i in range(90))
                            + " [/INST]", add_bos=False) for t in range(args.turns)] for c in range(args.conversations)]

    def run(cache_mb: str) -> tuple[list, list, dict]:
        proc, url = start_server(model, "bench", *flags, "--prefix-cache-mb", cache_mb)
        http = httpx.Client(timeout=600)
        answers, first = [None] * args.conversations, [None] * args.conversations

        def converse(c: int):
            prompt, answers[c], first[c] = [1], [], []
            for t in range(args.turns):
                prompt = prompt + messages[c][t]
                t0 = time.perf_counter()
                text, times = stream(http, url, {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                                                 "ignore_eos": True})
                first[c].append(times[0] - t0)
                answers[c].append(text)
                prompt = prompt + tok.encode(text, add_bos=False)  # the answer, as a chat client resends it
            answers[c].append(len(prompt))

        try:
            threads = [threading.Thread(target=converse, args=(c,)) for c in range(args.conversations)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            m = metrics(http, url)
        finally:
            proc.terminate()
            proc.wait()
        return answers, first, m

    with_cache, ttft_on, m = run("1024")
    without, ttft_off, _ = run("0")
    last_on = statistics.median(f[-1] for f in ttft_on)
    last_off = statistics.median(f[-1] for f in ttft_off)
    history = statistics.mean(a[-1] for a in with_cache)
    print(f"{args.conversations} conversations x {args.turns} turns, {history:.0f} tokens by the last turn, "
          f"{args.max_tokens} tokens per answer: last-turn time to first token (median) with the prefix cache "
          f"{last_on * 1000:.0f} ms, without {last_off * 1000:.0f} ms: {last_on / last_off:.2f}x; "
          f"hits {m['zamba2_prefix_cache_hits_total']:.0f}/{m['zamba2_prefix_cache_lookups_total']:.0f} lookups, "
          f"prompt tokens prefilled {m['zamba2_prefilled_tokens_total'] / m['zamba2_prompt_tokens_total']:.1%}; "
          f"identical answers {sum(a == b for a, b in zip(with_cache, without))}/{args.conversations}")


def arrivals(model: str, flags: list[str], args) -> None:
    proc, url = start_server(model, "bench", *flags)
    http = httpx.Client(timeout=600)
    long_prompt = [1] + [(7 * i) % 31000 + 3 for i in range(args.arrival_tokens - 1)]

    def gaps(with_arrivals: bool) -> tuple[list[float], list[float]]:
        results, ttft = [None] * args.streams, []

        def decode(i: int):
            results[i] = stream(http, url, {"prompt": [1, 100 + i, 200 + i], "max_tokens": args.max_tokens,
                                            "temperature": 0, "ignore_eos": True})[1]

        def arrive():
            t0 = time.perf_counter()
            stream(http, url, {"prompt": long_prompt, "max_tokens": 1, "temperature": 0})
            ttft.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=decode, args=(i,)) for i in range(args.streams)]
        for th in threads:
            th.start()
        if with_arrivals:
            time.sleep(1)
            for _ in range(args.arrivals_count):
                threads.append(threading.Thread(target=arrive))
                threads[-1].start()
                time.sleep(1)
        for th in threads:
            th.join()
        return [b - a for times in results for a, b in zip(times, times[1:])], ttft

    try:
        stream(http, url, {"prompt": long_prompt[:600], "max_tokens": 2})  # warm-up
        quiet, _ = gaps(False)
        busy, ttft = gaps(True)
    finally:
        proc.terminate()
        proc.wait()

    def pct(xs, q):
        return statistics.quantiles(xs, n=100)[q - 1] * 1000

    print(f"{args.streams} streams x {args.max_tokens} tokens; {args.arrivals_count} prompts of {args.arrival_tokens} "
          f"tokens arriving 1/s: inter-token latency quiet p50 {pct(quiet, 50):.0f} ms p99 {pct(quiet, 99):.0f} ms, "
          f"with arrivals p50 {pct(busy, 50):.0f} ms p99 {pct(busy, 99):.0f} ms = {pct(busy, 99) / pct(quiet, 50):.1f}x "
          f"quiet p50; arrivals' time to first token {min(ttft):.1f}-{max(ttft):.1f} s")


if __name__ == "__main__":
    main()
