"""A checkpoint ready to run: weights, optional int8 / int4 matmuls and the tokenizer, loaded once for every entry
point (`zamba2 generate`, `zamba2 serve`, `zamba2 eval`)."""

from __future__ import annotations

import os

import torch

from ..errors import UserError
from ..hub import resolve
from ..model.checkpoint import load
from ..model.zamba2 import Zamba2LM
from ..ops.layers import INT4_GROUP, Quantization
from ..text.tokenizer import Tokenizer, load_tokenizer


def load_for_inference(path: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str = "cpu",
                       int8: bool = False, int4: bool = False,
                       revision: str | None = None) -> tuple[Zamba2LM, Tokenizer]:
    """The model at `path` (a folder, or a Hub repo id at `revision`: hub.resolve) in `dtype` on `device` and its
    tokenizer, refused when it has more tokens than the model's vocabulary (see load_tokenizer). int8 / int4:
    weight-only matmuls, each projection quantized as it is read (a folder `zamba2 quantize` wrote loads as it
    was quantized, without either)."""
    if int8 and int4:
        raise UserError("int8 and int4 weights: choose one")
    quantization = Quantization(8) if int8 else Quantization(4, INT4_GROUP) if int4 else None
    path = resolve(path, revision)
    model = load(path, getattr(torch, dtype) if isinstance(dtype, str) else dtype, device, quantization)
    return model, load_tokenizer(path, model.config.vocab_size)
