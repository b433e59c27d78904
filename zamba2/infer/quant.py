"""Weight-only int8 for CPU inference: every matmul weight as int8 with one scale per output row.

Decode on a CPU reads every weight once per token, so its speed is the weight bytes over the memory
bandwidth: int8 reads a quarter of float32. For a few rows (decode) the matmuls are those of kernels.py,
which read the int8 rows at the memory's speed inside the compiled decode layers. For many rows (prefill)
`dequantized_matmul` turns a block of weight rows at a time into the GEMM dtype and calls the public GEMM.
Both round inputs and outputs to bfloat16. (torch's private `_weight_int8pack_mm` did this in one kernel,
but crashed on some shapes on AVX-512 CPUs, and ran 3-12x slower than dequantize + bf16 GEMM on AMX.)
The embedding stays in the model dtype (a lookup reads one row per token); the LM head gets its own int8
copy of it when the two are tied.

The accuracy cost (logit error, perplexity change) is measured by bench/quant.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import kernels
from ..ops.decode import FUSABLE
from ..errors import UserError
from ..model.zamba2 import FEW_ROWS, Linear, Zamba2LM
from ..ops.hardware import NATIVE_BF16

# Weight rows dequantised at a time in a prefill: small enough to stay in the caches next to the GEMM, large
# enough for the GEMM to run at its rate. bf16 with AMX, 8512x2048 weight: 4 MB blocks ran 17/64/512/2048 rows at
# 0.13/0.30/0.48/0.81 of the bf16 GEMM on the dequantised weight (1 MB: up to 0.79, 16 MB: up to 0.79).
DEQUANT_BLOCK_BYTES = 4 << 20


class Int8Linear(nn.Module):
    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # symmetric, per output row
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))  # the kernel wants x's dtype
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


@torch.no_grad()
def quantize_int8(model: Zamba2LM) -> Zamba2LM:
    """Replace every Linear of `model` (in place) by Int8Linear; returns the model, now inference-only.

    A layer whose input width is not a multiple of 8 (none in the released models, only the adapters' rank-r
    up-projections of tiny test models) stays in float: too narrow to gain from int8.
    """
    if model.device.type != "cpu":
        raise UserError("int8 weight-only quantization is a CPU path; the model is on " + str(model.device))
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Linear) and child.in_features % 8 == 0:
                setattr(module, name, Int8Linear(child.weight, child.bias))
    if model.lm_head is None:  # tied: the head gets its own int8 copy, the lookup keeps the float embedding
        model.lm_head = Int8Linear(model.embed_tokens.weight, None)
    model.quantized = "int8"
    return model.eval().requires_grad_(False)
