"""The Triton decode kernels (zamba2/gpu_kernels.py) against the mixer's torch code (tests/ops/triton_check.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECK = Path(__file__).with_name("triton_check.py")


def test_triton_mixer_step_in_the_interpreter():
    """On the CPU, through Triton's interpreter: in a subprocess, as TRITON_INTERPRET is read when Triton loads."""
    pytest.importorskip("triton")
    tests = os.pathsep.join(filter(None, [str(CHECK.parents[1]), os.environ.get("PYTHONPATH")]))  # for conftest
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=tests)
    done = subprocess.run([sys.executable, str(CHECK)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_mixer_step_on_the_gpu(dtype):
    from triton_check import SHAPES, check

    for shape in SHAPES:
        check("cuda", dtype, **shape)
