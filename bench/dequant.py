"""int8 / int4 prefill: `dequantized_matmul` (ops/layers.py) against the GEMM on the already-dequantized weight.

    python bench/dequant.py [--n 8512 --k 2048] [--int4 [--group-size 64]]

For 17, 64, 512 and 2048 rows and dequantization blocks of 1, 4 and 16 MB, prints the time of the bf16 GEMM
on a weight dequantized beforehand (the limit: dequantizing costs nothing) and, per block size, that time
divided by dequantized_matmul's (1.0 = as fast as the limit). The GEMM dtype is the one the CPU gets
(bfloat16 with bf16 instructions, else float32); the block size sets ops.layers.DEQUANT_BLOCK_BYTES.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import cpu_summary  # noqa: E402

from zamba2.ops import layers  # noqa: E402


def seconds(fn, budget: float = 0.5) -> float:
    fn()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < budget:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8512, help="output features (default: 1.2B's in_proj)")
    ap.add_argument("--k", type=int, default=2048, help="input features")
    ap.add_argument("--int4", action="store_true", help="int4 weights (ops.layers.Int4Linear), not int8")
    ap.add_argument("--group-size", type=int, default=layers.INT4_GROUP, help="int4 weights per scale")
    args = ap.parse_args()
    torch.manual_seed(0)
    w = torch.randn(args.n, args.k) / 50
    q = layers.Int4Linear.quantize(w, None, args.group_size) if args.int4 else layers.Int8Linear.quantize(w, None)
    native = q.dequantize(0, args.n).bfloat16()
    print(f"{cpu_summary()}; weight {args.n}x{args.k} " + (f"int4, groups of {args.group_size}" if args.int4 else "int8"))
    for rows in (17, 64, 512, 2048):
        x = torch.randn(rows, args.k).bfloat16()
        limit = seconds(lambda: x @ native.t())
        ratios = []
        for mb in (1, 4, 16):
            layers.DEQUANT_BLOCK_BYTES = mb << 20
            ratios.append(f"{mb} MB {limit / seconds(lambda: layers.dequantized_matmul(x, q.dequantize, args.n)):.2f}")
        print(f"  {rows:5d} rows: bf16 GEMM {2 * rows * args.n * args.k / limit / 1e9:6.0f} GFLOP/s; "
              f"dequantized_matmul / it: " + ", ".join(ratios), flush=True)


if __name__ == "__main__":
    main()
