"""int8 weight-only layers (zamba2/ops/layers.py, made by zamba2/infer/quant.py) against a plain dequantized
reference."""

import pytest
import torch
import torch.nn.functional as F

from zamba2.ops import layers
from zamba2.ops import kernels


def int8_reference(x, w, scale):
    """x rounded to bfloat16 @ (w * scale)^T in float32, rounded to bfloat16: what every int8 path computes."""
    return F.linear(x.bfloat16().float(), w.float() * scale.float()[:, None]).bfloat16().float()


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("n,k_", [(37, 24), (35, 24), (37, 16), (64, 520)])
def test_int8_gemv_equals_dequantized_reference(rows, n, k_):
    if (k := kernels.get()) is None:
        pytest.skip("no CPU kernels here")
    w = torch.randint(-127, 128, (n, k_), dtype=torch.int8)
    scale, x = (torch.rand(n) / (127 * k_ ** 0.5)).bfloat16(), torch.randn(rows, k_)  # outputs ~0.5
    torch.testing.assert_close(k.gemv(w, x, scale), int8_reference(x, w, scale), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("native_bf16", [True, False])  # the GEMM dtype chosen by CPU feature, forced each way
@pytest.mark.parametrize("rows,n,k", [(17, 37, 24), (64, 301, 520), (100, 1031, 40)])
def test_dequantized_matmul_equals_reference(monkeypatch, native_bf16, rows, n, k):
    monkeypatch.setattr(layers, "NATIVE_BF16", native_bf16)
    monkeypatch.setattr(layers, "DEQUANT_BLOCK_BYTES", 40 * k)  # several blocks of 20-40 rows, the last ragged
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale, x = (torch.rand(n) / (127 * k ** 0.5)).bfloat16(), torch.randn(rows, k).bfloat16()  # outputs ~0.5
    y = layers.dequantized_matmul(x, w, scale)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    # float32: the same sums in another order (an output ulp apart); bf16: weight * scale rounded, an ulp or two
    tol = dict(rtol=1e-2, atol=1e-2) if native_bf16 else dict(rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(y.float(), int8_reference(x, w, scale), **tol)


@pytest.mark.parametrize("rows", [1, 16, 17, 300])  # decode GEMV, prefill matmul
def test_int8_linear_equals_reference(rows):
    base = torch.nn.Linear(48, 72)
    q = layers.Int8Linear(base.weight, base.bias)
    x = torch.randn(2, rows, 48)
    y = q(x)
    assert y.shape == (2, rows, 72) and y.dtype == x.dtype
    ref = int8_reference(x.reshape(-1, 48), q.weight, q.scale).view(2, rows, 72) + base.bias
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=2e-2)
    assert (y - base(x)).norm() / base(x).norm() < 0.02  # and int8 is close to the float layer
