"""Weight-only int8 and int4 for CPU inference: `quantize_int8` / `quantize_int4` swap every Linear for
ops.layers.Int8Linear / Int4Linear.

Decode on a CPU reads every weight once per token, so its speed is the weight bytes over the memory
bandwidth: int8 reads a quarter of float32, int4 (groups of 64, a bfloat16 scale and offset per group) 0.14.
What stays in the model dtype is what the projections do not hold: the embedding (a lookup reads one row per
token; the LM head gets its own quantized copy of it when the two are tied), the Mamba mixers' A_log, dt_bias,
D and conv, every norm, and the recurrent state, which the SSM literature finds precision-sensitive. The
accuracy cost (logit error, perplexity change) is measured by bench/quant.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..model.zamba2 import Zamba2LM
from ..ops.layers import INT4_BLOCK, INT4_GROUP, Int4Linear, Int8Linear, Linear


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


@torch.no_grad()
def quantize(model: Zamba2LM, q: Quantization) -> Zamba2LM:
    """Replace every Linear of `model` (in place) by its `q` form; returns the model, now inference-only."""
    if model.device.type != "cpu":
        raise UserError(f"{q.name} weight-only quantization is a CPU path; the model is on {model.device}")
    if model.quantized:
        raise UserError(f"this model is already {model.quantized}-quantized")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Linear) and (new := q.layer(child.weight, child.bias)) is not None:
                setattr(module, name, new)
    if model.lm_head is None:  # tied: the head gets its own quantized copy, the lookup keeps the float embedding
        model.lm_head = q.layer(model.embed_tokens.weight, None)
    model.quantized = q.name
    return model.eval().requires_grad_(False)


def quantize_int8(model: Zamba2LM) -> Zamba2LM:
    """Every projection int8 with a scale per output row (see `quantize`)."""
    return quantize(model, Quantization(8))


def quantize_int4(model: Zamba2LM, group_size: int = INT4_GROUP) -> Zamba2LM:
    """Every projection int4 with a scale and offset per group of `group_size` weights along its rows."""
    return quantize(model, Quantization(4, group_size))
