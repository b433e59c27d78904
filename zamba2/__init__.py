"""zamba2: exact, fast Zamba2 (Mamba2 + shared attention) models in PyTorch."""

from .model.cache import HybridCache
from .model.checkpoint import CheckpointError, load, save
from .model.config import Config, preset, tiny
from .infer.generate import generate, sample, stream
from .model.zamba2 import Zamba2LM
from .infer.quant import quantize_int8
from .text.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Config", "Zamba2LM", "HybridCache", "CheckpointError", "load", "save", "generate", "stream", "sample",
           "preset", "tiny", "quantize_int8", "Tokenizer", "load_tokenizer"]
