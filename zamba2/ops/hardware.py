"""What this machine's processors offer, asked in one place by the code that picks a path by it.

The compiled kernels pick their instruction set in kernels.py (ISA_FLAGS, from torch's reading of the CPU).
"""

from __future__ import annotations

import torch

# bf16 instructions (AVX512-BF16; every CPU with AMX has them): torch's oneDNN then runs bf16 GEMMs natively,
# with AMX at 6-7x its float32 rate on the 2-core Sapphire Rapids Xeon (`python bench/compare.py --preset small
# --dtype bfloat16` prints both rates).
# Without them a bf16 GEMM is emulated, many times slower than float32.
NATIVE_BF16 = torch.cpu._is_avx512_bf16_supported()


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls outrun float32 ones on `device` (what mixed-precision training defaults to)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and NATIVE_BF16
