"""Weight-only int8 and int4 for CPU inference: `quantize_int8` / `quantize_int4` swap every Linear for
ops.layers.Int8Linear / Int4Linear.

Decode on a CPU reads every weight once per token, so its speed is the weight bytes over the memory
bandwidth: int8 reads a quarter of float32, int4 (groups of 64, a bfloat16 scale and offset per group) 0.14.
What stays in the model dtype is what the projections do not hold: the embedding (a lookup reads one row per
token; the LM head gets its own quantized copy of it when the two are tied), the Mamba mixers' A_log, dt_bias,
D and conv (and Zamba1's per-head x_proj / dt_proj, 4% of a Mamba1 layer at the 7B shape), every norm, and the
recurrent state, which the SSM literature finds precision-sensitive. The
accuracy cost (logit error, perplexity change) is measured by bench/quant.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..hub import resolve
from ..model.checkpoint import load, save
from ..model.zamba2 import Zamba2LM
from ..ops.layers import INT4_GROUP, Linear, Quantization


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


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, bits: int, group_size: int = INT4_GROUP,
                        dtype: torch.dtype = torch.float32, revision: str | None = None) -> Zamba2LM:
    """`zamba2 quantize`: write the checkpoint at `src` with `bits`-bit projections to folder `out`, which every
    loader then reads as it is (its config.json records the format), with the other files of `src` (tokenizer,
    generation config). `src` may be a Hub repo id (at `revision`, hub.resolve). Quantized while reading (see
    checkpoint.load); the rest of the weights, and the weights the projections are quantized from, in `dtype`.
    Returns the quantized model."""
    src, out = resolve(src, revision), Path(out)
    if out.resolve() == src.resolve():
        raise UserError(f"--out {out} is the source checkpoint; write the quantized one to another folder")
    model = load(src, dtype, "cpu", Quantization(bits, group_size if bits == 4 else None))
    save(model, out)
    written = {"config.json", "model.safetensors.index.json"}
    for f in src.iterdir():
        if f.is_file() and f.name not in written and not (f.name.startswith(("model", "pytorch_model"))
                                                          and f.suffix in (".safetensors", ".bin", ".json")):
            shutil.copy2(f, out / f.name)
    return model
