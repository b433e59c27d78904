"""The model's projections and norms, with their CPU/GPU dispatch: the only layers that know the hardware.

`Linear` and `RMSNorm` compute what nn.Linear and an RMS norm compute, choosing per call between the
compiled CPU kernels (kernels.py), BLAS in the orientation that measured faster, and plain torch, which is
also the reference the tests compare with. `Int8Linear` holds weight-only int8 (infer/quant.py makes it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .decode import FUSABLE
from .hardware import NATIVE_BF16

FEW_ROWS = 16
WIDE = (1024, 512)  # (out, in) features from which a prompt's float32 matmul runs as linear_rows (see linear)
FUSED_DTYPES = (torch.float32, torch.bfloat16)  # what the compiled decode takes (kernels.py, decode.py)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, with CPU paths that measured faster on the 2-core AMD EPYC (AVX2; bench/compare.py):

    - few rows (decode), float32 or bfloat16: the compiled GEMV (kernels.py), a streaming read of the
      weight at 1.5-2.5x MKL's rate on decode shapes. Without it, float32: (W @ x^T)^T, where MKL's GEMM
      with the weight as the left operand ran 1.5-3x faster for 2-16 rows and no slower for one.
    - many rows (prefill), float32, a projection at least WIDE: the compiled linear_rows (W @ x^T, then an
      AVX2 transpose back; csrc/cpu_matmul.cpp). It ran a 1.2B prefill 1.1x faster (80% -> 89% of the
      matmul rate); narrower projections (the rank-r adapters) ran slower that way.
    - bfloat16 without bf16 instructions, more than 16 rows (prefill): computed in float32. There torch's
      bf16 GEMM costs a whole GEMV per row (9x slower than float32 at 2048 rows), while upcasting the
      weight costs about one matmul row pass; for few rows (decode) that upcast would cost more than it saves.
    """
    rows = x.numel() // x.shape[-1]
    if rows <= FEW_ROWS:
        if weight.dtype in FUSED_DTYPES and weight.is_contiguous() and (k := kernels.get(x, weight)) is not None:
            y = k.gemv(weight, x.reshape(rows, -1).float().contiguous())  # [rows, out] float32
        elif x.device.type == "cpu" and x.dtype == torch.float32:
            y = (weight @ x.reshape(rows, -1).t()).t()
        else:
            return F.linear(x, weight, bias)
    elif x.device.type == "cpu" and x.dtype == torch.bfloat16 and not NATIVE_BF16:
        return linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    elif (x.dtype == weight.dtype == torch.float32 and weight.shape[0] >= WIDE[0] and weight.shape[1] >= WIDE[1]
          and (k := kernels.get(x, weight)) is not None):
        y = k.linear_rows(x.reshape(rows, -1), weight)
    else:
        return F.linear(x, weight, bias)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])  # [..., out]


class Linear(nn.Linear):
    scale = None  # weights are used as stored (quant.Int8Linear has a scale per row)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


FUSABLE.add(Linear)  # the compiled decode reads its weight itself (decode.py)


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back, then scale (the multiply runs in the input dtype, as transformers does)."""

    def __init__(self, dim: int, eps: float, group_size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.group_size = group_size or dim

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if (gate is None and rows <= FEW_ROWS and self.group_size == x.shape[-1] and x.dtype in FUSED_DTYPES
                and x.dtype == self.weight.dtype and x.is_contiguous()
                and (k := kernels.get(x, self.weight)) is not None):
            return k.rms_norm(x.view(rows, -1), self.weight, self.eps).view(x.shape)  # decode: one call
        dtype = x.dtype
        x = x.float()
        if gate is not None:  # Mamba2's gated norm: gate before normalising (norm_before_gate=False)
            x = x * F.silu(gate.float())
        xg = x.view(*x.shape[:-1], -1, self.group_size)  # per-group RMS (groups of d_inner / ngroups)
        xg = F.rms_norm(xg, (self.group_size,), eps=self.eps)  # x * rsqrt(mean(x^2) + eps), one fused op
        return self.weight * xg.view(x.shape).to(dtype)


# Weight rows dequantised at a time in a prefill: small enough to stay in the caches next to the GEMM, large
# enough for the GEMM to run at its rate. `python bench/dequant.py` on the Sapphire Rapids Xeon (AMX bf16): 4 MB
# blocks ran 17/64/512/2048 rows at 0.14/0.22/0.56/0.82 of the GEMM on the dequantised weight; 1 MB
# 0.18/0.20/0.12/0.75, 16 MB 0.06/0.30/0.31/0.66.
DEQUANT_BLOCK_BYTES = 4 << 20


class Int8Linear(nn.Module):
    """Weight-only int8: for a few rows (decode) the compiled GEMV reads the int8 rows at the memory's speed
    (also inside the compiled decode step); for many rows (prefill) `dequantized_matmul`. Both round inputs
    and outputs to bfloat16. (torch's private `_weight_int8pack_mm` did this in one kernel, but crashed on some
    shapes on AVX-512 CPUs; with AMX it ran 512-2048 rows at 0.09-0.10 of the bf16 GEMM, where
    `dequantized_matmul` runs 0.56-0.82, `python bench/dequant.py`.)"""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # symmetric, per output row
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))  # in bf16, as the inputs are rounded
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # [rows, K]
        if x2.shape[0] <= FEW_ROWS and (k := kernels.get(x)) is not None:  # decode: the streaming GEMV
            y = k.gemv(self.weight, x2.float().contiguous(), self.scale)  # [rows, N], rounded to bfloat16 inside
        else:
            y = dequantized_matmul(x2, self.weight, self.scale)
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def dequantized_matmul(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """x [M, K] bfloat16 @ (weight [N, K] int8 * scale [N])^T -> [M, N] bfloat16, a block of weight rows at a time.

    In float32 (few rows, or a CPU without bf16 instructions, where torch's bf16 GEMM is many times slower) the
    int8 values enter the GEMM exactly and the scale multiplies the sums: the decode GEMV's arithmetic. In
    bfloat16 (many rows on a CPU with bf16 instructions: AMX ran it 3-5x the float32 GEMM) weight * scale is
    rounded to bfloat16 once, which moves outputs by an ulp or two.
    """
    native = NATIVE_BF16 and x.shape[0] > FEW_ROWS
    dtype = torch.bfloat16 if native else torch.float32
    x = x.to(dtype)
    n, k = weight.shape
    y = x.new_empty(x.shape[0], n)  # [M, N]
    block = max(16, DEQUANT_BLOCK_BYTES // (k * x.element_size()))
    for n0 in range(0, n, block):
        w = weight[n0:n0 + block].to(dtype)  # [block, K]
        if native:
            w.mul_(scale[n0:n0 + block, None])
        torch.mm(x, w.t(), out=y[:, n0:n0 + block])
    if not native:
        y.mul_(scale.float())
    return y.to(torch.bfloat16)


FUSABLE.add(Int8Linear)  # the compiled decode reads int8 weights and their scales itself (decode.py)
