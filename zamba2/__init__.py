"""zamba2: exact, fast Zamba2 (Mamba2 + shared attention) models in PyTorch."""

from .cache import HybridCache
from .checkpoint import CheckpointError, load, save
from .config import Config, preset, tiny
from .generate import generate, sample, stream
from .model import Zamba2LM
from .quant import quantize_int8
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["Config", "Zamba2LM", "HybridCache", "CheckpointError", "load", "save", "generate", "stream", "sample",
           "preset", "tiny", "quantize_int8", "Tokenizer", "load_tokenizer"]
