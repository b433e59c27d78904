"""The compiled CPU decode kernels (csrc/cpu_decode.cpp), built with the machine's C++ compiler on first use.

Decode on a CPU is a stream of small matrix-vector products and ~40 tiny ops per layer; in eager torch
both fall well short of the memory bandwidth (bench/compare.py). The kernels replace them for inference
on x86 CPUs with AVX2 + FMA. Where they cannot be built (no compiler, another CPU) or ZAMBA2_CPU_KERNELS=0,
`get()` returns None and the model runs its torch code, which is also the reference the tests compare with.
The build is cached by torch under ~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR moves it).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

import torch

ENABLED = os.environ.get("ZAMBA2_CPU_KERNELS", "1") != "0"


def get(*tensors: torch.Tensor):
    """The kernel module for an inference op on `tensors`, or None: disabled, not built here, a tensor off the
    CPU, or autograd tracking one (the kernels have no backward)."""
    if not ENABLED:
        return None
    grad = torch.is_grad_enabled()
    for t in tensors:  # a plain loop: this runs several times per layer and token
        if not t.is_cpu or grad and t.requires_grad:
            return None
    return _build()


@functools.cache
def _build():
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    from torch.utils import cpp_extension

    src = Path(__file__).parent / "csrc" / "cpu_decode.cpp"
    build_dir = Path(cpp_extension._get_build_directory("zamba2_cpu_decode", verbose=False))
    if not any(build_dir.glob("*.so")):
        print("zamba2: compiling the CPU decode kernels (once, about 30 s)", file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(
            "zamba2_cpu_decode", [str(src)], extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the torch code still works
        tail = " | ".join(str(e).strip().splitlines()[-3:])  # a failed build's message is the whole compiler log
        warnings.warn(f"zamba2: CPU decode kernels unavailable, decode runs slower in plain torch ({tail})")
        return None
