"""Weight-only int8 for CPU inference: `quantize_int8` swaps every Linear for ops.layers.Int8Linear, int8
weights with one scale per output row.

Decode on a CPU reads every weight once per token, so its speed is the weight bytes over the memory
bandwidth: int8 reads a quarter of float32. The embedding stays in the model dtype (a lookup reads one row
per token); the LM head gets its own int8 copy of it when the two are tied. The accuracy cost (logit
error, perplexity change) is measured by bench/quant.py.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..model.zamba2 import Zamba2LM
from ..ops.layers import Int8Linear, Linear


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
