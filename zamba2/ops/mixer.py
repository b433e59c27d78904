"""The Mamba2 mixer between in_proj and out_proj through compiled kernels, where they can run: the mixer's backends.

Mamba2Mixer.forward (model/zamba2.py) hands its in_proj output here first and runs its own torch code, the
reference the tests compare with, when this returns None:
  - decode on a GPU: the Triton step (gpu_kernels.py: conv step, state update, gated norm in three kernels);
  - decode on the CPU: mamba_step (csrc/cpu_decode.cpp);
  - a prompt piece on the CPU: mamba_prefill (csrc/cpu_prefill.cpp: conv, chunked scan and gated norm).
The kernels have no backward, so nothing they read may be tracked by autograd (kernels.untracked), and they take
neither padding nor packed documents (the torch code handles those).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .layers import FUSED_DTYPES


def mamba_mixer(mixer, zx: Tensor, conv_state: Tensor | None, ssm_state: Tensor | None,
                chunk_size: int) -> Tensor | None:
    """zx [b,l, z | xBC | dt] -> y [b,l,d_inner] (before out_proj), the states updated in place; None where no
    kernel applies. `mixer` is a Mamba2Mixer: its step_params() are what every kernel reads."""
    b, l, _ = zx.shape
    params = mixer.step_params()
    tensors = [t for t in params[:6] if t is not None]
    if conv_state is not None and not conv_state.is_contiguous():
        return None
    if l == 1 and ssm_state is not None and zx.is_cuda:
        from . import gpu_kernels  # imports Triton, so only on a GPU

        if (g := gpu_kernels.get(zx, *tensors)) is None:
            return None
        return g.mamba_step(zx.view(b, -1), conv_state, ssm_state, *params).view(b, 1, -1)
    if zx.dtype not in FUSED_DTYPES or (k := kernels.get(zx, *tensors)) is None:
        return None
    if l == 1 and ssm_state is not None:
        return k.mamba_step(zx.view(b, -1), conv_state, ssm_state, *params).view(b, 1, -1).to(zx.dtype)
    if mixer.headdim % 8:  # the prefill kernel's tiles take 8 channels of a head at a time
        return None
    if conv_state is None:  # no cache: the states start at zero and are dropped
        conv_state = zx.new_zeros(b, mixer.conv_dim, mixer.conv1d.kernel_size[0] - 1)
        ssm_state = zx.new_zeros(b, mixer.heads, mixer.headdim, mixer.state, dtype=torch.float32)
    return k.mamba_prefill(zx, conv_state, ssm_state, *params, chunk_size)
