"""Weight-only int8 for CPU inference: every matmul weight as int8 with one scale per output row.

Decode on a CPU reads every weight once per token, so its speed is the weight bytes over the memory
bandwidth: int8 reads a quarter of float32. The matmul is torch's `_weight_int8pack_mm` (x in bfloat16,
int8 weights dequantised on the fly inside the kernel); it is fast for few rows (decode), and about 2x
slower than a float32 GEMM for long prefills. The embedding stays in the model dtype (a lookup reads one
row per token); the LM head gets its own int8 copy of it when the two are tied.

For a few rows (decode) the matmuls are instead those of kernels.py, which read the int8 rows at the
memory's speed inside the compiled decode layers; they round inputs and outputs to bfloat16 as the torch
kernel does.

The accuracy cost (logit error, perplexity change) is measured by bench/quant.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import kernels
from .decode import FUSABLE
from .model import FEW_ROWS, Linear, Zamba2LM


class Int8Linear(nn.Module):
    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # symmetric, per output row
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))  # the kernel wants x's dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()  # the kernel assumes row-major
        if x2.shape[0] <= FEW_ROWS and (k := kernels.get(x)) is not None:  # decode: the streaming GEMV
            y = k.gemv(self.weight, x2.float(), self.scale)  # rounds to bfloat16 as the torch kernel does
        else:
            y = torch._weight_int8pack_mm(x2, self.weight, self.scale)
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


FUSABLE.add(Int8Linear)  # the compiled decode reads int8 weights and their scales itself (decode.py)


@torch.no_grad()
def quantize_int8(model: Zamba2LM) -> Zamba2LM:
    """Replace every Linear of `model` (in place) by Int8Linear; returns the model, now inference-only.

    A layer whose input width is not a multiple of 8 (none in the released models) stays in float.
    """
    if model.device.type != "cpu":
        raise ValueError("int8 weight-only quantization is a CPU decode path; the model is on " + str(model.device))
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Linear) and child.in_features % 8 == 0:  # the kernel crashes on other widths
                setattr(module, name, Int8Linear(child.weight, child.bias))
    if model.lm_head is None:  # tied: the head gets its own int8 copy, the lookup keeps the float embedding
        model.lm_head = Int8Linear(model.embed_tokens.weight, None)
    model.quantized = "int8"
    return model.eval().requires_grad_(False)
