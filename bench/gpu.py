"""zamba2 on a GPU: time to first token, decode with and without CUDA graphs, batch scaling; transformers beside it.

    python bench/gpu.py [--preset 1.2b] [--dtype bfloat16] [--prompt 2048] [--batches 1,8,32] [--skip-hf]

Random weights of the preset's shape, in one run:
- time to first token: prefill of a --prompt-token prompt (in pieces of zamba2.infer.step.PREFILL_CHUNK) and the
  first greedy token, median of 5;
- decode tokens/s after a 128-token prompt, 64 new greedy tokens, per batch size: CUDA graphs (graphs.py) and
  eager (ZAMBA2_CUDA_GRAPHS=0's path), timed from the first generated token to the last;
- fractions of this GPU's limits it measures itself: bfloat16 matmul FLOP/s (8192^3) for prefill, memory read
  GB/s (a 2 GiB reduction) for decode, whose bytes are the weights each step reads (the shared block once per
  use) plus the KV cache it attends over;
- transformers.Zamba2ForCausalLM on the same weights (it uses mamba_ssm / causal_conv1d when installed), and
  whether the greedy tokens of the two agree at batch 1.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import zamba2
from zamba2.infer import graphs
from zamba2.infer.step import prefill

from compare import effective_params, prefill_flops

PROMPT, NEW_TOKENS = 128, 64


def seconds(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def gpu_limits(dtype: torch.dtype) -> dict:
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    x = torch.ones(2**30 // 2, dtype=torch.float32, device="cuda")  # 2 GiB
    return {"matmul": 2 * n**3 / seconds(lambda: a @ b), "read": x.numel() * 4 / seconds(lambda: x.sum())}


def decode_rate(generate_tokens, ids) -> float:
    """Tokens/s from the first generated token to the last (the prefill excluded)."""
    def run():
        stamps = []
        for _ in generate_tokens(ids):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
        return stamps[-1] - stamps[0]
    run()
    return ids.shape[0] * (NEW_TOKENS - 1) / statistics.median(run() for _ in range(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="1.2b", choices=["tiny", "small", "1.2b"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--prompt", type=int, default=2048, help="prompt length for time to first token")
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU (bench/compare.py measures the CPU)")
    dtype, batches = getattr(torch, args.dtype), [int(b) for b in args.batches.split(",")]
    limits = gpu_limits(dtype)
    print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | {args.dtype} | matmul "
          f"{limits['matmul'] / 1e12:.0f} TFLOP/s, read {limits['read'] / 1e12:.2f} TB/s")

    torch.manual_seed(0)
    model = zamba2.Zamba2LM(zamba2.preset(args.preset)).to("cuda", dtype).eval()
    c, p_eff = model.config, effective_params(model)
    kv_bytes = len(c.hybrid_layer_ids) * 2 * c.num_key_value_heads * c.attention_head_dim * dtype.itemsize
    g = torch.Generator().manual_seed(0)
    long_ids = torch.randint(3, c.vocab_size, (1, args.prompt), generator=g).cuda()
    prompts = {b: torch.randint(3, c.vocab_size, (b, PROMPT), generator=g).cuda() for b in batches}
    rows = {}
    with torch.inference_mode():
        ttft = seconds(lambda: prefill(model, long_ids, model.new_cache(1, args.prompt + 1))[:, -1].argmax(-1))
        rows["ttft"] = ttft
        for b, ids in prompts.items():
            for name, on in (("graphs", True), ("eager", False)):
                graphs.ENABLED = on
                rows[(b, name)] = decode_rate(lambda x: zamba2.stream(model, x, NEW_TOKENS), ids)
        graphs.ENABLED = True
        ours_tokens = zamba2.generate(model, prompts[batches[0]][:1], NEW_TOKENS)[:, PROMPT:]

    # the bytes a decode step reads: every weight once (the shared block per use), and the KV of its context
    def read_fraction(tok_s: float, b: int) -> float:
        step_bytes = p_eff * dtype.itemsize + b * (PROMPT + NEW_TOKENS / 2) * kv_bytes
        return tok_s / b * step_bytes / limits["read"]

    flops = prefill_flops(c, p_eff, args.prompt)
    print(f"\npreset {args.preset}: {p_eff / 1e6:.0f}M effective params per token")
    print(f"time to first token, {args.prompt}-token prompt: {ttft * 1e3:.1f} ms "
          f"({100 * flops / ttft / limits['matmul']:.0f}% of the matmul rate)")
    print(f"{'decode':<10}{'graphs tok/s':>14}{'eager tok/s':>13}{'graphs/eager':>14}{'%read BW':>10}{'vs b=1':>8}")
    for b in batches:
        fast, slow = rows[(b, "graphs")], rows[(b, "eager")]
        print(f"{'b=' + str(b):<10}{fast:>14.1f}{slow:>13.1f}{fast / slow:>13.2f}x"
              f"{100 * read_fraction(fast, b):>9.0f}%{fast / rows[(batches[0], 'graphs')]:>7.1f}x")

    if not args.skip_hf:
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        with tempfile.TemporaryDirectory() as tmp:
            zamba2.save(model, tmp)
            del model
            hf = transformers.Zamba2ForCausalLM.from_pretrained(tmp, dtype=dtype).cuda().eval()
        hf.generation_config.eos_token_id = None
        with torch.inference_mode():
            hf_ttft = seconds(lambda: hf(long_ids, use_cache=True, logits_to_keep=1).logits.argmax(-1))
            ids = prompts[batches[0]][:1]
            gen = lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,  # noqa: E731
                                      do_sample=False, pad_token_id=0)
            hf_secs = seconds(gen, reps=3)
            hf_tokens = gen()[:, PROMPT:]
        print(f"\ntransformers {transformers.__version__}: time to first token {hf_ttft * 1e3:.1f} ms "
              f"(zamba2 {ttft / hf_ttft:.2f}x its time); decode b=1 {NEW_TOKENS / hf_secs:.1f} tok/s including "
              f"its prefill of {PROMPT} tokens")
        same = int((ours_tokens == hf_tokens).sum())
        print(f"greedy tokens b=1: {same}/{NEW_TOKENS} equal"
              + ("" if same == NEW_TOKENS else f", first mismatch at {int((ours_tokens != hf_tokens).nonzero()[0, 1])}"
                 " (bfloat16 near-ties)"))


if __name__ == "__main__":
    main()
