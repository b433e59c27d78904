"""The model's projections and norms, with their CPU/GPU dispatch: the only layers that know the hardware.

`Linear` and `RMSNorm` compute what nn.Linear and an RMS norm compute, choosing per call between the
compiled CPU kernels (kernels.py), BLAS in the orientation that measured faster, and plain torch, which is
also the reference the tests compare with. `Int8Linear` holds weight-only int8 (infer/quant.py makes it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
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
# Float rows quantised at a time: bounds the working memory of quantising one tensor (a 7B's embedding is 459 MB
# in float32, and quantising takes a few temporaries of that size), which a streaming load keeps small.
QUANTIZE_BLOCK_BYTES = 32 << 20


class QuantizedLinear(nn.Module):
    """Weight-only quantized projection: for a few rows (decode) the compiled GEMV reads the quantized rows at the
    memory's speed (also inside the compiled decode step, which takes `weight` and `scale` as stored); for many
    rows (prefill) `dequantized_matmul`. Both round inputs and outputs to bfloat16. Subclasses say how `weight`
    and `scale` hold the values (`dequantize`) and make them from float weights (`quantize`); the constructor
    takes them as stored (a quantized checkpoint). Inference only: the buffers have no gradient."""

    weight: Tensor
    scale: Tensor

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantize(self, n0: int, n1: int) -> Tensor:
        """Rows n0:n1 of the weight in float32, [n1 - n0, in_features]."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # [rows, K]
        if x2.shape[0] <= FEW_ROWS and (k := kernels.get(x)) is not None:  # decode: the streaming GEMV
            y = k.gemv(self.weight, x2.float().contiguous(), self.scale)  # [rows, N], rounded to bfloat16 inside
        else:
            y = dequantized_matmul(x2, self.dequantize, self.scale.shape[0])
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def quantize_by_rows(weight: Tensor, quantize_rows) -> tuple[Tensor, ...]:
    """quantize_rows (float32 rows -> tensors of as many rows) over `weight` a block of rows at a time."""
    rows = max(1, QUANTIZE_BLOCK_BYTES // (4 * weight.shape[1]))
    parts = [quantize_rows(weight[n0:n0 + rows].detach().float()) for n0 in range(0, weight.shape[0], rows)]
    return tuple(torch.cat(p) for p in zip(*parts))


class Int8Linear(QuantizedLinear):
    """Weight-only int8, symmetric, one scale per output row: weight [N, K] int8, scale [N] bfloat16. (torch's
    private `_weight_int8pack_mm` did the prefill in one kernel, but crashed on some shapes on AVX-512 CPUs; with
    AMX it ran 512-2048 rows at 0.09-0.10 of the bf16 GEMM, where `dequantized_matmul` runs 0.56-0.82,
    `python bench/dequant.py`.)"""

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None) -> "Int8Linear":
        return cls(*quantize_by_rows(weight, cls.quantize_rows), bias)

    @staticmethod
    def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # symmetric, per output row
        q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        return q, scale.to(torch.bfloat16)  # in bf16, as the inputs are rounded

    def dequantize(self, n0: int, n1: int) -> Tensor:
        return self.weight[n0:n1].float() * self.scale[n0:n1, None].float()  # exact: 7 x 8 significant bits


INT4_BLOCK = 32  # weights per packing block (see Int4Linear); a group holds whole blocks
INT4_GROUP = 64  # weights per int4 scale by default (bench/quant.py measures 32, 64, 128)


class Int4Linear(QuantizedLinear):
    """Weight-only int4 in groups of `group_size` weights along each row (the input dimension): w = s q + m with
    q in 0..15 and a bfloat16 scale s and offset m per group, set by the group's min and max (asymmetric).

    weight [N, K/2] uint8 holds two weights a byte, in blocks of 32: byte j of a block holds weight j in its low
    nibble and weight 16 + j in its high one, so that 8 (AVX2) or 16 (AVX-512) bytes widen into the low and
    the high half of a block with one load and a shift (csrc/cpu_decode.cpp). scale [N, K / group_size, 2]
    bfloat16 holds (s, m) per group.

    The compiled decode GEMV also rounds each group of its inputs to int8 (x = d p, d = max|x| / 127), so that a
    group's products sum exactly in integers, as llama.cpp's 4-bit formats do; a prompt's rows (and the torch
    code) multiply the dequantized weights by the inputs as they are. `python bench/quant.py` measures both.
    """

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None, group_size: int) -> "Int4Linear":
        if group_size % INT4_BLOCK or weight.shape[1] % group_size:
            raise ValueError(f"int4 groups must be multiples of {INT4_BLOCK} that divide the rows "
                             f"({weight.shape[1]}), not {group_size}")
        return cls(*quantize_by_rows(weight, lambda w: cls.quantize_rows(w, group_size)), bias)

    @staticmethod
    def quantize_rows(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
        n, k = w.shape
        g = w.view(n, k // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        s = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16).float()
        m = lo.to(torch.bfloat16).float()
        q = ((g - m[..., None]) / s[..., None]).round().clamp(0, 15).to(torch.uint8).view(n, k // INT4_BLOCK, 2, 16)
        packed = (q[:, :, 0] | q[:, :, 1] << 4).view(n, k // 2)  # byte j: weight j | weight 16 + j << 4
        return packed, torch.stack([s, m], -1).to(torch.bfloat16)

    def dequantize(self, n0: int, n1: int) -> Tensor:
        b = self.weight[n0:n1].unflatten(1, (-1, 1, 16))  # [rows, K/32, 1, 16]
        q = torch.cat([b & 15, b >> 4], 2).float()  # [rows, K/32, 2, 16]: block order restored
        s, m = self.scale[n0:n1].float().unbind(-1)  # [rows, K/G] each
        rows, groups = s.shape
        return torch.addcmul(m[..., None], q.view(rows, groups, -1), s[..., None]).view(rows, -1)


def dequantized_matmul(x: Tensor, dequantize, n: int) -> Tensor:
    """x [M, K] bfloat16 @ W^T -> [M, N] bfloat16, W [N, K] dequantized a block of rows at a time by
    `dequantize(n0, n1)` (float32 rows n0:n1).

    In float32 (few rows, or a CPU without bf16 instructions, where torch's bf16 GEMM is many times slower) the
    dequantized values enter the GEMM exactly, as in the decode GEMV. In bfloat16 (many rows on a CPU with bf16
    instructions: AMX ran it 3-5x the float32 GEMM) they are rounded to bfloat16 once, which moves outputs by
    an ulp or two.
    """
    native = NATIVE_BF16 and x.shape[0] > FEW_ROWS
    dtype = torch.bfloat16 if native else torch.float32
    x = x.to(dtype)
    y = x.new_empty(x.shape[0], n)  # [M, N]
    block = max(16, DEQUANT_BLOCK_BYTES // (x.shape[1] * x.element_size()))
    for n0 in range(0, n, block):
        n1 = min(n, n0 + block)
        torch.mm(x, dequantize(n0, n1).to(dtype).t(), out=y[:, n0:n1])
    return y.to(torch.bfloat16)


@dataclass(frozen=True)
class Quantization:
    """A weight format: bits 8 (a scale per row) or 4 (a scale and offset per group of group_size weights)."""

    bits: int
    group_size: int | None = None

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise UserError(f"quantization: bits must be 8 or 4, not {self.bits}")
        if self.bits == 4 and (not isinstance(self.group_size, int) or self.group_size <= 0
                               or self.group_size % INT4_BLOCK):
            raise UserError(f"int4 group size must be a positive multiple of {INT4_BLOCK}, not {self.group_size}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def layer(self, weight: Tensor, bias: Tensor | None) -> nn.Module | None:
        """The quantized projection for a float one, or None where it stays in float: an input width not a
        multiple of 8 (int8) or of the group (int4); none in the released models, only the adapters' rank-r
        up-projections of tiny test models."""
        if self.bits == 8:
            return Int8Linear.quantize(weight, bias) if weight.shape[1] % 8 == 0 else None
        return Int4Linear.quantize(weight, bias, self.group_size) if weight.shape[1] % self.group_size == 0 else None

    def empty(self, n: int, k: int, bias: bool) -> QuantizedLinear:
        """The quantized form of an n x k projection, its tensors on the meta device (to be loaded)."""
        meta = dict(device="meta")
        b = torch.empty(n, **meta) if bias else None
        if self.bits == 8:
            return Int8Linear(torch.empty(n, k, dtype=torch.int8, **meta), torch.empty(n, dtype=torch.bfloat16, **meta), b)
        return Int4Linear(torch.empty(n, k // 2, dtype=torch.uint8, **meta),
                          torch.empty(n, k // self.group_size, 2, dtype=torch.bfloat16, **meta), b)

    @staticmethod
    def of(model: nn.Module) -> "Quantization | None":
        """The format of a model's quantized projections (None when it has none)."""
        for m in model.modules():
            if isinstance(m, Int8Linear):
                return Quantization(8)
            if isinstance(m, Int4Linear):
                return Quantization(4, 2 * m.weight.shape[1] // m.scale.shape[1])
        return None

    def to_dict(self) -> dict:
        """What a quantized checkpoint's config.json records under "quantization_config"."""
        return {"quant_method": "zamba2", "bits": self.bits, **({"group_size": self.group_size} if self.bits == 4 else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "Quantization":
        if not isinstance(d, dict) or d.get("quant_method") != "zamba2" or not {"bits"} <= set(d) <= {"quant_method", "bits", "group_size"}:
            raise UserError(f"quantization_config {d!r} is not one zamba2 writes (quant_method zamba2, bits, group_size)")
        return cls(d["bits"], d.get("group_size"))


FUSABLE.update((Int8Linear, Int4Linear))  # the compiled decode reads quantized weights and scales itself (decode.py)
