"""int8 and int4 weight-only layers (zamba2/ops/layers.py, made by zamba2/infer/quant.py) against a plain dequantized
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
    y = layers.dequantized_matmul(x, layers.Int8Linear(w, scale, None).dequantize, n)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    # float32: the same sums in another order (an output ulp apart); bf16: weight * scale rounded, an ulp or two
    tol = dict(rtol=1e-2, atol=1e-2) if native_bf16 else dict(rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(y.float(), int8_reference(x, w, scale), **tol)


@pytest.mark.parametrize("rows", [1, 16, 17, 300])  # decode GEMV, prefill matmul
def test_int8_linear_equals_reference(rows):
    base = torch.nn.Linear(48, 72)
    q = layers.Int8Linear.quantize(base.weight, base.bias)
    x = torch.randn(2, rows, 48)
    y = q(x)
    assert y.shape == (2, rows, 72) and y.dtype == x.dtype
    ref = int8_reference(x.reshape(-1, 48), q.weight, q.scale).view(2, rows, 72) + base.bias
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=2e-2)
    assert (y - base(x)).norm() / base(x).norm() < 0.02  # and int8 is close to the float layer


def int4_reference(x, q):
    """x rounded to bfloat16 @ (s q + m)^T in float32, rounded to bfloat16, from the unpacked nibbles."""
    n, k = q.weight.shape[0], 2 * q.weight.shape[1]
    blocks = q.weight.view(n, k // 32, 16)
    nibbles = torch.stack([blocks & 15, blocks >> 4], 2).view(n, k)  # byte j of a block: weights j and 16 + j
    s, m = q.scale.float().unbind(-1)  # [n, k / group]
    w = nibbles.float() * s.repeat_interleave(k // s.shape[1], 1) + m.repeat_interleave(k // s.shape[1], 1)
    return F.linear(x.bfloat16().float(), w).bfloat16().float()


def int4_decode_reference(x, q):
    """What the decode GEMV computes for int4: x rounded to bfloat16, then per group of the weights' quantized to
    int8 by its largest magnitude (x = d p, p in -127..127), the integer sums of nibble times p scaled by s d, plus
    the offset m times the group's sum of x; rounded to bfloat16."""
    n, k = q.weight.shape[0], 2 * q.weight.shape[1]
    blocks = q.weight.view(n, k // 32, 16)
    nibbles = torch.stack([blocks & 15, blocks >> 4], 2).view(n, k).double()
    s, m = q.scale.double().unbind(-1)  # [n, G] each
    x = x.bfloat16().float().view(x.shape[0], s.shape[1], -1)  # [rows, G, group]
    amax = x.abs().amax(-1, keepdim=True)
    p = (x * torch.where(amax > 0, 127 / amax, 0)).round()
    dots = torch.einsum("rgj,ngj->rng", p.double(), nibbles.view(n, s.shape[1], -1))  # exact integer sums
    y = (dots * s * (amax / 127).double().transpose(1, 2) + m * x.double().sum(-1)[:, None]).sum(-1)
    return y.float().bfloat16().float()


@pytest.mark.parametrize("rows", [1, 3, 8, 16])
@pytest.mark.parametrize("n,k,group", [(72, 64, 64), (37, 96, 32), (131, 384, 128), (64, 512, 64)])
def test_int4_gemv_equals_integer_reference(rows, n, k, group):
    if (kern := kernels.get()) is None:
        pytest.skip("no CPU kernels here")
    _, q = int4_layer(n, k, group)
    x = torch.randn(rows, k)
    x[0, :group] *= 50  # an outlier group
    x[-1, -group:] = 0.0  # an all-zero group
    y = kern.gemv(q.weight, x, q.scale)
    torch.testing.assert_close(y, int4_decode_reference(x, q), rtol=1e-2, atol=1e-3 * y.abs().max())


def int4_layer(n, k, group, seed=0):
    torch.manual_seed(seed)
    base = torch.randn(n, k) / k ** 0.5
    base[:, :group] *= 8  # groups of very different ranges
    base[0] = 0.0  # a constant row: zero range
    return base, layers.Int4Linear.quantize(base, None, group)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_quantization_round_trips(group):
    base, q = int4_layer(37, 256, group)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (37, 128) and q.scale.shape == (37, 256 // group, 2)
    w = q.dequantize(0, 37)
    # every weight within half a step of its group (plus the bf16 rounding of the scale and offset)
    step = q.scale[..., 0].float().repeat_interleave(group, 1)
    assert ((w - base).abs() <= 0.52 * step + 1e-2 * base.abs()).all()
    torch.testing.assert_close(q.dequantize(5, 9), w[5:9])
    with pytest.raises(ValueError, match="multiples of 32"):
        layers.Int4Linear.quantize(base, None, 48)


@pytest.mark.parametrize("native_bf16", [True, False])
@pytest.mark.parametrize("rows,n,k,group", [(17, 37, 64, 32), (64, 301, 512, 128), (100, 1031, 192, 64)])
def test_int4_dequantized_matmul_equals_reference(monkeypatch, native_bf16, rows, n, k, group):
    monkeypatch.setattr(layers, "NATIVE_BF16", native_bf16)
    monkeypatch.setattr(layers, "DEQUANT_BLOCK_BYTES", 40 * k)  # several blocks of 20-40 rows, the last ragged
    _, q = int4_layer(n, k, group)
    x = torch.randn(rows, k).bfloat16()
    y, ref = layers.dequantized_matmul(x, q.dequantize, n), int4_reference(x, q)
    # outputs up to ~6 (the first group is 8x the others): an ulp or two of the larger ones
    tol = dict(rtol=1e-2, atol=1e-2 * ref.abs().max()) if native_bf16 else dict(rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(y.float(), ref, **tol)


@pytest.mark.parametrize("rows", [1, 8, 16, 17, 300])  # decode GEMV (batch 1 and 8), prefill matmul
@pytest.mark.parametrize("n,k,group", [(72, 64, 64), (37, 96, 32), (131, 384, 128)])  # ragged rows, 1-3+ groups
def test_int4_linear_equals_reference(rows, n, k, group):
    base = torch.nn.Linear(k, n)
    q = layers.Int4Linear.quantize(base.weight, base.bias, group)
    x = torch.randn(2, rows, k)
    y = q(x)
    assert y.shape == (2, rows, n) and y.dtype == x.dtype
    gemv = 2 * rows <= layers.FEW_ROWS and kernels.get() is not None  # int8 activations (int4_decode_reference)
    ref = (int4_decode_reference if gemv else int4_reference)(x.reshape(-1, k), q).view(2, rows, n) + base.bias
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=2e-2)
    assert (y - base(x)).norm() / base(x).norm() < 0.15  # and int4 is near the float layer
