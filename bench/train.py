"""Training throughput: zamba2 against transformers.Zamba2ForCausalLM, and the FLOP utilisation it implies.

    python bench/train.py --preset small --seq-len 2048 [--batch 1] [--steps 4] [--skip-hf] [--json out.json]

One optimizer step = forward + backward + AdamW on a batch of random tokens, as `zamba2 train` runs it
(flush-to-zero on, see Trainer): ours in float32 and in bfloat16 mixed precision (float32 weights and
optimizer state, bf16 autocast: zamba2 train's default where the CPU has bf16 instructions), transformers
in float32. All start from the same random weights. The
model FLOPs per token are those of the PaLM MFU convention, extended to the SSD scan:
  6 x effective parameters (every matmul weight, with the shared block counted once per use)
  + 3 x the forward FLOPs of causal attention (2 x seq x attention width per visit: QK^T and AV, halved)
  + 3 x the forward FLOPs of the chunked scan (C.B and M.x inside each chunk, the chunk states and their
    read-out).
Utilisation = achieved model FLOP/s / this machine's float32 matmul rate (measured here, 2048^3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import cpu_summary, effective_params, machine_limits  # noqa: E402

import zamba2  # noqa: E402
from zamba2.train.trainer import NO_DECAY  # noqa: E402


def flops_per_token(model: zamba2.Zamba2LM, seq: int) -> dict:
    c = model.config
    visits = len(c.hybrid_layer_ids)
    q = min(c.chunk_size, seq)
    h, p, g, n = c.n_mamba_heads, c.mamba_headdim, c.mamba_ngroups, c.mamba_d_state
    attention = 2 * seq * c.attention_hidden_size * visits  # 2 matmuls x 2 FLOPs x seq x width, halved (causal)
    scan = c.num_hidden_layers * 2 * (q * g * n + q * h * p + 2 * h * p * n)
    return {"params": 6 * effective_params(model), "attention": 3 * attention, "scan": 3 * scan}


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n.split(".")[-1] not in NO_DECAY]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2 or n.split(".")[-1] in NO_DECAY]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-4, fused=False)


def step_seconds(forward, model, ids: torch.Tensor, steps: int, dtype: torch.dtype = torch.float32) -> float:
    """Median seconds of one optimizer step (after one warm-up step), forward and backward under `dtype` autocast."""
    opt = optimizer(model)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = forward(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del logits, loss  # as the Trainer's loop does: the 2048 x 32000 logits kept to the next step cost 1.5x in bf16
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = zamba2.Zamba2LM(zamba2.preset(args.preset, max_position_embeddings=max(4096, args.seq_len)))
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len + 1))
    tokens = args.batch * args.seq_len
    flops = flops_per_token(model, args.seq_len)
    limits = machine_limits(torch.bfloat16)  # float32 and bfloat16
    print(f"{cpu_summary()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, batch "
          f"{args.batch} x {args.seq_len} tokens, float32; model FLOPs/token {sum(flops.values()) / 1e6:.0f}M "
          f"(params {flops['params'] / 1e6:.0f}M, attention {flops['attention'] / 1e6:.0f}M, "
          f"scan {flops['scan'] / 1e6:.0f}M); matmul rate {limits['matmul_float32'] / 1e9:.1f} GFLOP/s")

    results = {"ours": step_seconds(lambda x: model(x), model, ids, args.steps),
               "ours bf16 mixed": step_seconds(lambda x: model(x), model, ids, args.steps, torch.bfloat16)}
    if not args.skip_hf:
        from transformers import Zamba2ForCausalLM

        with tempfile.TemporaryDirectory() as tmp:
            zamba2.save(model, tmp)
            del model
            hf = Zamba2ForCausalLM.from_pretrained(tmp, dtype=torch.float32).train()
        results["transformers"] = step_seconds(lambda x: hf(x).logits, hf, ids, args.steps)

    rows = {}
    for name, sec in results.items():
        tps = tokens / sec
        rows[name] = {"step_s": sec, "tokens_per_s": tps,
                      "mfu": tps * sum(flops.values()) / limits["matmul_float32"]}
        print(f"  {name:15s} {sec:7.2f} s/step  {tps:8.0f} tok/s  {100 * rows[name]['mfu']:5.1f}% of matmul rate")
    print(f"  bf16 mixed / float32: {rows['ours bf16 mixed']['tokens_per_s'] / rows['ours']['tokens_per_s']:.2f}x "
          f"(bf16 matmul rate / float32: {limits['matmul_bfloat16'] / limits['matmul_float32']:.2f}x)")
    if "transformers" in rows:
        print(f"  zamba2 / transformers: {rows['ours']['tokens_per_s'] / rows['transformers']['tokens_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "seq_len": args.seq_len, "batch": args.batch, "flops": flops,
                       "limits": limits, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
