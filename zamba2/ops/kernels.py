"""The compiled CPU kernels (csrc/), built with the machine's C++ compiler on first use.

Decode on a CPU is a stream of small matrix-vector products and ~40 tiny ops per layer; in eager torch
both fall well short of the memory bandwidth (bench/compare.py), and the prefill's scan runs far below the
matmul rate. The kernels (cpu_decode.cpp, cpu_prefill.cpp, and cpu_matmul.cpp for the prompts' matmuls)
replace them for inference on x86 CPUs with AVX2 + FMA, built for AVX-512 where the CPU has it (ISA_FLAGS).
Where they cannot be built (no compiler, another CPU) or ZAMBA2_CPU_KERNELS=0, `get()` returns None and the
model runs its torch code, which is also the reference the tests compare with. The build is cached by torch
under ~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR moves it), named by what the binary depends on.
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
    CPU, autograd tracking one (the kernels have no backward), or autocast on."""
    return _build() if ENABLED and untracked(tensors, "cpu") else None


def untracked(tensors, device_type: str) -> bool:
    """Whether all `tensors` are on `device_type`, autograd tracks none (the compiled kernels, here and in
    gpu_kernels.py, have no backward) and no autocast is on (they compute in the tensors' own dtypes)."""
    if torch.is_autocast_enabled(device_type):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # a plain loop: this runs several times per layer and token
        if t.device.type != device_type or grad and t.requires_grad:
            return False
    return True


# The one place that picks the instruction set: torch's own reading of the CPU (ATEN_CPU_CAPABILITY=avx2 forces
# the AVX2 build on an AVX-512 CPU, as it forces torch's own kernels). AVX-512 doubles the float lanes of the
# GEMV and the scan's tiles (common.h's Vec); on the 2-core Sapphire Rapids Xeon its small decode ran within
# the noise of the AVX2 build (bench/compare.py, alternating processes): both top out near 150 GFLOP/s there.
ISA_FLAGS = {"AVX2": ["-mavx2", "-mfma"],
             "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]}
ISA_FLAGS["AVX512_VNNI"] = [*ISA_FLAGS["AVX512"], "-mavx512vnni"]  # the int4 GEMV's int8 dot products in one instruction


def instruction_set() -> str:
    """torch's reading of the CPU (AVX2, AVX512, ...), with VNNI added where an AVX-512 CPU has it."""
    isa = torch.backends.cpu.get_cpu_capability()
    return "AVX512_VNNI" if isa == "AVX512" and torch.cpu._is_vnni_supported() else isa


def build_name(isa: str, sources: list[Path]) -> str:
    """The build's name: a hash of everything the binary depends on (the sources, header included, which torch's
    own change check does not read; torch's version and C++ ABI; Python's; the instruction set), so that
    switching between Python installs, torch builds or CPUs builds anew instead of loading a stale binary. Also the
    sources' folder: torch's build file names them by path, and two checkouts sharing a build would rebuild it
    each time the other one loads."""
    digest = hashlib.sha1(str(sources[0].parent).encode())
    for f in sources:
        digest.update(f.read_bytes())
    digest.update(f"{torch.__version__} {torch._C._GLIBCXX_USE_CXX11_ABI} {sys.version} {isa}".encode())
    return f"zamba2_cpu_{isa.lower()}_{digest.hexdigest()[:10]}"


@functools.cache
def _build():
    isa = instruction_set()
    if isa not in ISA_FLAGS:
        return None
    from torch.utils import cpp_extension

    csrc = Path(__file__).parent / "csrc"
    sources = sorted(f for f in csrc.iterdir() if f.suffix in (".cpp", ".h"))
    name = build_name(isa, sources)
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    if not any(build_dir.glob("*.so")):
        print(f"zamba2: compiling the CPU kernels for this machine ({isa}), about a minute, once",
              file=sys.stderr, flush=True)
    try:
        import fcntl

        # torch's own build lock is a file that a killed build leaves behind, and every later process then waits
        # on it forever; an flock is released by the system when its holder dies, so while holding one, a
        # leftover torch lock is stale
        with open(build_dir / "zamba2.flock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)
            return cpp_extension.load(
                name, [str(f) for f in sources if f.suffix == ".cpp"],
                extra_cflags=["-O3", "-fopenmp", *ISA_FLAGS[isa]], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the torch code still works
        tail = " | ".join(str(e).strip().splitlines()[-3:])  # a failed build's message is the whole compiler log
        warnings.warn(f"zamba2: CPU kernels unavailable, inference runs slower in plain torch ({tail})")
        return None
