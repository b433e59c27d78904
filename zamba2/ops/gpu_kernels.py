"""Triton kernels for decode on a GPU: a Mamba2 mixer's step between in_proj and out_proj in three kernels.

In torch the step is about 20 kernels per layer (conv, softplus, the state update, D skip, gated norm), each
far shorter than its launch; even replayed from a CUDA graph (graphs.py) their count dominates a small
batch's step. Here: (1) the depthwise conv step + SiLU over all channels, shifting the conv state; (2) per
(row, head) the state update S = exp(dt A) S + dt x B^T, y = S C + D x, gated by SiLU(z); (3) the RMS norm per
group. (1) is separate because every head of a group reads the group's B/C channels, whose conv state (1)
rewrites. Everything is computed in float32; the model's torch code (Mamba2Mixer.forward) is the reference,
and tests run these kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from . import kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the torch code runs
    triton = None


def get(*tensors: Tensor):
    """This module when its kernels can run on `tensors` (Triton installed, CUDA tensors, no autograd), else None
    (the same contract as kernels.get)."""
    return sys.modules[__name__] if triton is not None and kernels.untracked(tensors, "cuda") else None


if triton is not None:
    @triton.jit
    def _conv_step(zx, conv_state, w, bias, out, proj, di, cd, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK: tl.constexpr):
        row, c = tl.program_id(0), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < cd
        new = tl.load(zx + row * proj + di + c, mask=m).to(tl.float32)
        state = conv_state + (row * cd + c) * (K - 1)  # [K-1] per channel, oldest first
        acc = tl.load(w + c * K + K - 1, mask=m).to(tl.float32) * new
        if HAS_BIAS:
            acc += tl.load(bias + c, mask=m).to(tl.float32)
        for j in tl.static_range(K - 1):
            old = tl.load(state + j, mask=m)
            acc += tl.load(w + c * K + j, mask=m).to(tl.float32) * old.to(tl.float32)
            if j > 0:
                tl.store(state + j - 1, old, mask=m)
        tl.store(state + K - 2, new.to(conv_state.dtype.element_ty), mask=m)
        tl.store(out + row * cd + c, acc * tl.sigmoid(acc), mask=m)

    @triton.jit
    def _ssm_step(zx, xbc, dt_bias, A_log, D, ssm, y, proj, di, cd, H, G, dt_min, P: tl.constexpr,
                  N: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
        row, h = tl.program_id(0), tl.program_id(1)
        g = h // (H // G)
        p, n = tl.arange(0, BP), tl.arange(0, BN)
        mp, mn = p < P, n < N
        dt = tl.load(zx + row * proj + di + cd + h).to(tl.float32) + tl.load(dt_bias + h).to(tl.float32)
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))  # softplus, torch's threshold
        dt = tl.maximum(dt, dt_min)
        decay = tl.exp(-dt * tl.exp(tl.load(A_log + h).to(tl.float32)))
        x = tl.load(xbc + row * cd + h * P + p, mask=mp, other=0.0)
        B = tl.load(xbc + row * cd + di + g * N + n, mask=mn, other=0.0)
        C = tl.load(xbc + row * cd + di + G * N + g * N + n, mask=mn, other=0.0)
        at = ssm + ((row * H + h) * P + p[:, None]) * N + n[None, :]  # [P, N]
        both = mp[:, None] & mn[None, :]
        S = tl.load(at, mask=both, other=0.0) * decay + (dt * x)[:, None] * B[None, :]
        tl.store(at, S, mask=both)
        out = tl.sum(S * C[None, :], axis=1) + tl.load(D + h).to(tl.float32) * x
        z = tl.load(zx + row * proj + h * P + p, mask=mp, other=0.0).to(tl.float32)
        tl.store(y + row * di + h * P + p, out * z * tl.sigmoid(z), mask=mp)

    @triton.jit
    def _group_norm(y, w, out, di, gs, eps, BLOCK: tl.constexpr):
        row, g = tl.program_id(0), tl.program_id(1)
        i = tl.arange(0, BLOCK)
        m = i < gs
        v = tl.load(y + row * di + g * gs + i, mask=m, other=0.0)
        r = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / gs + eps)
        normed = tl.load(w + g * gs + i, mask=m).to(tl.float32) * (v * r)
        tl.store(out + row * di + g * gs + i, normed.to(out.dtype.element_ty), mask=m)


def mamba_step(zx: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_w: Tensor, conv_b: Tensor | None,
               dt_bias: Tensor, A_log: Tensor, D: Tensor, norm_w: Tensor, groups: int, dt_min: float,
               eps: float) -> Tensor:
    """zx [b, in_proj] (z | x | B | C | dt) of one token -> y [b, d_inner] in zx's dtype, ready for out_proj.
    conv_state [b, conv_dim, k-1] and ssm_state [b, h, p, n] (float32) are updated in place."""
    zx = zx.contiguous()
    b, proj = zx.shape
    cd, k = conv_state.shape[1], conv_w.shape[-1]
    H, P, N = ssm_state.shape[1:]
    di = H * P
    if not (conv_state.is_contiguous() and ssm_state.is_contiguous() and ssm_state.dtype == torch.float32
            and proj == di + cd + H):
        raise ValueError("mamba_step: zx [b, d_inner + conv_dim + heads], contiguous conv and float32 SSM states")
    xbc = torch.empty(b, cd, device=zx.device, dtype=torch.float32)
    block = 256
    bias = conv_b if conv_b is not None else conv_w  # any pointer: HAS_BIAS=False never reads it
    _conv_step[(b, triton.cdiv(cd, block))](zx, conv_state, conv_w.reshape(cd, k), bias, xbc, proj, di, cd,
                                            K=k, HAS_BIAS=conv_b is not None, BLOCK=block)
    y = torch.empty(b, di, device=zx.device, dtype=torch.float32)
    _ssm_step[(b, H)](zx, xbc, dt_bias, A_log, D, ssm_state, y, proj, di, cd, H, groups, dt_min, P=P, N=N,
                      BP=triton.next_power_of_2(P), BN=triton.next_power_of_2(N))
    out = torch.empty(b, di, device=zx.device, dtype=zx.dtype)
    gs = di // groups
    _group_norm[(b, groups)](y, norm_w, out, di, gs, eps, BLOCK=triton.next_power_of_2(gs))
    return out
