"""The Triton mixer step (zamba2/ops/gpu_kernels.py) against the mixer's torch code, on one device.

    TRITON_INTERPRET=1 PYTHONPATH=tests python tests/ops/triton_check.py     (the CPU, through Triton's interpreter)

test_gpu_kernels.py runs this file in a subprocess (the interpreter must be chosen before Triton is imported),
and calls `check` directly on a GPU."""

import sys

import torch

from zamba2.ops import gpu_kernels, kernels

from conftest import random_model

SHAPES = [{}, {"hidden_size": 24, "mamba_d_state": 6, "mamba_ngroups": 1}, {"use_conv_bias": False}]  # P 16 | 12, N 8 | 6


@torch.no_grad()
def check(device: str, dtype: torch.dtype, batch: int = 3, steps: int = 3, **overrides) -> None:
    kernels.ENABLED = False  # the reference is the torch code
    mixer = random_model(**overrides).layers[0].mamba.to(device, dtype)
    c = mixer.conv_dim
    conv = torch.randn(batch, c, mixer.conv1d.kernel_size[0] - 1, device=device).to(dtype)
    ssm = torch.randn(batch, mixer.heads, mixer.headdim, mixer.state, device=device)
    conv_ref, ssm_ref = conv.clone(), ssm.clone()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for _ in range(steps):
        u = torch.randn(batch, 1, mixer.in_proj.in_features, device=device).to(dtype)
        ref = mixer(u, None, 8, conv_ref, ssm_ref)
        y = gpu_kernels.mamba_step(mixer.in_proj(u).view(batch, -1), conv, ssm, *mixer.step_params())
        torch.testing.assert_close(mixer.out_proj(y).view(batch, 1, -1), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(conv, conv_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(ssm, ssm_ref, rtol=tol, atol=tol)


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    for dtype in (torch.float32, torch.bfloat16):
        for shape in SHAPES:
            check(device, dtype, **shape)
    print("ok")
