"""Loading a large bf16 checkpoint with int4 / int8 weights: peak resident memory, and decode speed after.

    python bench/big_load.py write --dir /tmp/z7b [--preset 7b]          # random bf16 weights, sharded (~15 GB)
    python bench/big_load.py load --dir /tmp/z7b [--bits 4] [--dtype bfloat16]
    python bench/big_load.py ram                                          # the weights' memory per format

`write` stores the preset's shape with random weights as a Hugging Face style checkpoint in 2 GB safetensors
shards, one shard in memory at a time. `load` reads it in a fresh process as `zamba2 generate --int4` does
(each projection quantized as it is read: model/checkpoint.py load) and prints the peak resident memory of the
process (the kernel's high-water mark, file pages mapped while a tensor is read included) beside the memory
the loaded model holds and the largest tensor, then batch-1 greedy decode tokens/s (32 new tokens after a
16-token prompt, timed from the first new token to the last) against the memory read rate, counted on the
stored bytes every token reads. `ram` computes, from the presets' parameter counts, the memory the weights of
1.2B, 2.7B and 7B take in each format, and the state and KV cache a sequence adds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import cpu_summary, effective_params, machine_limits  # noqa: E402

import zamba2  # noqa: E402
from zamba2.model.checkpoint import native_to_hf  # noqa: E402
from zamba2.ops.layers import Quantization  # noqa: E402

SHARD_BYTES = 2 << 30


def write(args) -> None:
    out = Path(args.dir)
    cfg = zamba2.preset(args.preset)
    need = cfg.num_parameters() * 2
    free = shutil.disk_usage(out.parent if not out.exists() else out).free
    if free < need * 1.1:
        raise SystemExit(f"{out}: {free / 1e9:.1f} GB free, the checkpoint needs {need / 1e9:.1f} GB")
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in zamba2.Zamba2LM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    shards, shard, size = [], {}, 0
    for i, (name, shape) in enumerate(shapes.items()):
        t = torch.randn(shape, generator=gen).mul_(0.02)
        if name.endswith(("norm.weight", "layernorm.weight", ".D")):
            t.fill_(1.0)
        shard[native_to_hf(name, cfg)] = t.bfloat16()
        size += t.numel() * 2
        if size >= SHARD_BYTES or i == len(shapes) - 1:
            shards.append(shard)
            fname = f"model-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            print(f"  {fname}: {size / 1e9:.2f} GB", flush=True)
            shard, size = {}, 0
    weight_map = {k: f"model-{n:05d}.safetensors" for n, s in enumerate(shards, 1) for k in s}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save(out / "config.json")
    print(f"{args.preset}: {cfg.num_parameters() / 1e9:.2f}B parameters, bf16, {len(shards)} shards -> {out}")


def tensor_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def load(args) -> None:
    dtype = getattr(torch, args.dtype)
    q = Quantization(args.bits, args.group_size if args.bits == 4 else None)
    print(f"CPU: {cpu_summary()} | torch {torch.__version__} | {torch.get_num_threads()} threads", flush=True)
    index = json.loads((Path(args.dir) / "model.safetensors.index.json").read_text())
    cfg = zamba2.Config.from_json(Path(args.dir) / "config.json")
    with torch.device("meta"):
        float_model = zamba2.Zamba2LM(cfg)
    largest = max(p.numel() for p in float_model.state_dict().values())
    per_token = effective_params(float_model)  # weights a token reads: the shared blocks once per visit, the head
    on_disk = sum(f.stat().st_size for f in Path(args.dir).glob("*.safetensors"))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    model = zamba2.load(args.dir, dtype, quantization=q)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open("/proc/self/status") as f:
        rss = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))
    held = tensor_bytes(model)
    print(f"checkpoint: {on_disk / 1e9:.2f} GB bf16 in {len(set(index['weight_map'].values()))} shards; loaded as "
          f"{q.name} with the rest in {args.dtype} in {secs:.0f} s")
    print(f"model tensors {held / 1e9:.2f} GB; largest tensor {largest * 2 / 1e6:.0f} MB as stored, "
          f"{largest * dtype.itemsize / 1e6:.0f} MB in {args.dtype}; process before loading {rss0 / 1e9:.2f} GB")
    print(f"peak RSS {peak / 1e9:.2f} GB = model + {(peak - held) / 1e9:.2f} GB; RSS after {rss / 1e9:.2f} GB",
          flush=True)

    ids = torch.randint(3, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        stamps = [time.perf_counter() for _ in zamba2.stream(model, ids, 33)]
    rate = 32 / (stamps[-1] - stamps[0])
    read = machine_limits(torch.float32)["read"]
    stored = {"int8": 1.0, "int4": 0.5 + 4 / args.group_size}[q.name]
    print(f"decode batch 1: {rate:.2f} tokens/s; reads {per_token / 1e9:.2f}B weights x {stored:.3f} B = "
          f"{per_token * stored / 1e9:.2f} GB per token: {100 * rate * per_token * stored / read:.0f}% of the memory "
          f"read rate ({read / 1e9:.1f} GB/s)")


def weight_bytes(cfg: zamba2.Config, dtype: torch.dtype, q: Quantization | None) -> int:
    """The loaded model's tensors: projections as `q` stores them (tied head: a quantized copy of the embedding),
    everything else in `dtype`."""
    with torch.device("meta"):
        model = zamba2.Zamba2LM(cfg)
    total = 0
    for m in model.modules():
        for name, t in m.named_parameters(recurse=False):
            n, k = t.shape if t.dim() == 2 else (0, 0)
            if q is None or not isinstance(m, torch.nn.Linear) or name != "weight" or k % (q.group_size or 8):
                total += t.numel() * dtype.itemsize
            else:  # weights and scales (int8: a bf16 scale per row; int4: bf16 scale and offset per group)
                total += n * k + 2 * n if q.bits == 8 else n * k // 2 + 4 * n * k // q.group_size
    if q is not None and cfg.tie_word_embeddings:
        v, d = cfg.vocab_size, cfg.hidden_size
        total += v * d + 2 * v if q.bits == 8 else v * d // 2 + 4 * v * d // q.group_size
    return total


def ram(args) -> None:
    formats = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None),
               "int8": (torch.bfloat16, Quantization(8)), "int4": (torch.bfloat16, Quantization(4, args.group_size))}
    print("weights in GB (int8/int4: the embedding, norms and SSM parameters in bfloat16; a float32 model keeps "
          "them in float32)")
    print(f"{'model':8s}" + "".join(f"{f:>10s}" for f in formats) + f"{'SSM state':>12s}{'KV/token':>10s}")
    for name in ("1.2b", "2.7b", "7b"):
        cfg = zamba2.preset(name)
        sizes = [weight_bytes(cfg, dt, q) / 1e9 for dt, q in formats.values()]
        state = cfg.num_hidden_layers * cfg.n_mamba_heads * cfg.mamba_headdim * cfg.mamba_d_state * 4  # float32
        kv = len(cfg.hybrid_layer_ids) * 2 * cfg.num_key_value_heads * cfg.attention_head_dim * 2  # bfloat16
        print(f"{name:8s}" + "".join(f"{s:10.2f}" for s in sizes) + f"{state / 1e6:10.0f} MB{kv / 1e3:7.0f} KB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("write", "load", "ram"))
    ap.add_argument("--dir", help="checkpoint folder")
    ap.add_argument("--preset", default="7b", help="model shape to write (default 7b)")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="dtype of what stays in float (embedding, norms, SSM parameters)")
    args = ap.parse_args()
    {"write": write, "load": load, "ram": ram}[args.step](args)


if __name__ == "__main__":
    main()
