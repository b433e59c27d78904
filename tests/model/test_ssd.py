"""The chunked SSD scan and the decode step against the sequential recurrence."""

import pytest
import torch

from zamba2.model.ssd import ssd_chunked, ssd_sequential, ssd_step


def inputs(b=2, l=37, h=4, g=2, p=3, n=5, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen).to(dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=gen) - 1).to(dtype)
    A = -torch.exp(torch.randn(h, generator=gen))
    B = torch.randn(b, l, g, n, generator=gen).to(dtype)
    C = torch.randn(b, l, g, n, generator=gen).to(dtype)
    S0 = torch.randn(b, h, p, n, generator=gen)
    return x, dt, A, B, C, S0


@pytest.mark.parametrize("chunk", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("length", [1, 7, 8, 9, 16, 33])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_sequential(chunk, length, with_state):
    x, dt, A, B, C, S0 = inputs(l=length)
    S0 = S0 if with_state else None
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, S0)
    y, s = ssd_chunked(x, dt, A, B, C, chunk, S0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_chunked_bfloat16_inputs():
    x, dt, A, B, C, S0 = inputs(l=50, dtype=torch.bfloat16)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, S0)
    y, s = ssd_chunked(x, dt, A, B, C, 16, S0)
    assert y.dtype == torch.float32 and s.dtype == torch.float32  # accumulation stays fp32
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)


def test_chunked_stays_float32_under_autocast():
    """Mixed-precision training autocasts matmuls to bfloat16; the scan's own matmuls must not follow."""
    x, dt, A, B, C, S0 = inputs(l=50)
    y_ref, s_ref = ssd_chunked(x, dt, A, B, C, 16, S0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = ssd_chunked(x, dt, A, B, C, 16, S0)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)


def test_step_equals_sequential():
    x, dt, A, B, C, S0 = inputs(l=12)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, S0)
    state = S0.clone()
    ys = [ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state) for t in range(12)]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, s_ref, rtol=1e-5, atol=1e-5)


def test_split_scan_carries_state():
    x, dt, A, B, C, _ = inputs(l=40)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C)
    y1, s1 = ssd_chunked(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], 8)
    y2, s2 = ssd_chunked(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], 8, s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s_ref, rtol=1e-5, atol=1e-5)


def test_long_decay_stays_finite():
    x, dt, A, B, C, _ = inputs(l=300)
    y, s = ssd_chunked(x, dt * 50, A * 10, B, C, 256)  # strong decay: exp underflows, must not NaN
    assert torch.isfinite(y).all() and torch.isfinite(s).all()


@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_document_boundaries_reset_the_state(chunk):
    x, dt, A, B, C, S0 = inputs(l=29)
    doc = torch.tensor([[0] * 6 + [1] * 9 + [2] * 14, [0] * 20 + [1] * 9])
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, S0, doc=doc)
    y, s = ssd_chunked(x, dt, A, B, C, chunk, S0, doc=doc)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    # each document equals the document scanned alone (from a zero state after the first)
    y_alone, _ = ssd_sequential(x[:1, 6:15], dt[:1, 6:15], A, B[:1, 6:15], C[:1, 6:15])
    torch.testing.assert_close(y[:1, 6:15], y_alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_doc", [False, True])
def test_chunked_gradients_equal_sequential(with_doc):
    """Training backpropagates through the chunked form: its gradients must be the recurrence's."""
    x, dt, A, B, C, S0 = inputs(l=29)
    doc = torch.tensor([[0] * 6 + [1] * 9 + [2] * 14, [0] * 20 + [1] * 9]) if with_doc else None
    grads = []
    for scan in (lambda *a: ssd_sequential(*a, doc=doc), lambda *a: ssd_chunked(*a[:5], 5, a[5], doc=doc)):
        leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, S0)]
        y, s = scan(*leaves)
        (y.square().sum() + s.sin().sum()).backward()
        grads.append([t.grad for t in leaves])
    for g_chunked, g_ref in zip(*grads[::-1]):
        torch.testing.assert_close(g_chunked, g_ref, rtol=1e-4, atol=1e-4)
