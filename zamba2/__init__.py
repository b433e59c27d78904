"""zamba2: exact, fast Zamba2 (Mamba2 + shared attention) and Zamba1 (Mamba1 + shared attention) models in PyTorch."""

import os

# OpenMP threads spin after each parallel region, waiting for more work (libgomp: 300,000 spins). With two
# jobs on two cores that spinning starves the other job: each kept 0.10-0.38x of its speed alone in two runs of
# `python bench/contention.py`; with 3,000 spins each keeps 0.5x and a lone job its full speed. Read when torch
# loads OpenMP, so it holds when zamba2 is imported first (the command line); the user's own setting wins.
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "3000"

from .model.cache import HybridCache
from .model.checkpoint import CheckpointError, load, save
from .model.config import Config, preset, tiny
from .infer.generate import generate, stream
from .infer.step import sample
from .model.zamba2 import Zamba2LM
from .model.zamba1 import Zamba1LM
from .model.zamba1_config import Zamba1Config
from .infer.quant import quantize_int4, quantize_int8
from .text.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Config", "Zamba2LM", "Zamba1Config", "Zamba1LM", "HybridCache", "CheckpointError", "load", "save", "generate", "stream", "sample",
           "preset", "tiny", "quantize_int8", "quantize_int4", "Tokenizer", "load_tokenizer"]
