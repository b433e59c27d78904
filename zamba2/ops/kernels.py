"""The compiled CPU kernels (csrc/), built with the machine's C++ compiler on first use.

Decode on a CPU is a stream of small matrix-vector products and ~40 tiny ops per layer; in eager torch
both fall well short of the memory bandwidth (bench/compare.py), and the prefill's scan runs far below the
matmul rate. The kernels (cpu_decode.cpp, cpu_prefill.cpp, and cpu_matmul.cpp for the prompts' matmuls)
replace them for inference on x86 CPUs with AVX2 + FMA. Where they cannot be built (no compiler, another
CPU) or ZAMBA2_CPU_KERNELS=0, `get()` returns None and the model runs its torch code, which is also the reference the tests compare with.
The build is cached by torch under ~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR moves it).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

ENABLED = os.environ.get("ZAMBA2_CPU_KERNELS", "1") != "0"


def get(*tensors: torch.Tensor):
    """The kernel module for an inference op on `tensors`, or None: disabled, not built here, a tensor off the
    CPU, or autograd tracking one (the kernels have no backward)."""
    return _build() if ENABLED and untracked(tensors, "cpu") else None


def untracked(tensors, device_type: str) -> bool:
    """Whether all `tensors` are on `device_type` and autograd tracks none (the compiled kernels, here and in
    gpu_kernels.py, have no backward)."""
    grad = torch.is_grad_enabled()
    for t in tensors:  # a plain loop: this runs several times per layer and token
        if t.device.type != device_type or grad and t.requires_grad:
            return False
    return True


@functools.cache
def _build():
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    from torch.utils import cpp_extension

    csrc = Path(__file__).parent / "csrc"
    sources = sorted(csrc.glob("*.cpp"))
    # named by the sources' hash, header included: torch's own change check reads only the .cpp files
    digest = hashlib.sha1(b"".join(f.read_bytes() for f in sorted(csrc.iterdir()) if f.suffix in (".cpp", ".h")))
    name = f"zamba2_cpu_{digest.hexdigest()[:10]}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    if not any(build_dir.glob("*.so")):
        print("zamba2: compiling the CPU kernels (once, about a minute)", file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(
            name, [str(f) for f in sources], extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the torch code still works
        tail = " | ".join(str(e).strip().splitlines()[-3:])  # a failed build's message is the whole compiler log
        warnings.warn(f"zamba2: CPU kernels unavailable, inference runs slower in plain torch ({tail})")
        return None
