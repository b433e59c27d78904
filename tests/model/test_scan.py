"""The Mamba1 selective scan: the chunked form and the decode step against the sequential recurrence."""

import pytest
import torch

from zamba2.model.scan import selective_scan_chunked, selective_scan_sequential, selective_scan_step


def inputs(b=2, l=37, h=2, p=3, n=5, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen).to(dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, p, generator=gen) - 1).to(dtype)
    A = -torch.exp(torch.randn(h, p, n, generator=gen))  # per channel and state entry
    B = torch.randn(b, l, h, n, generator=gen).to(dtype)
    C = torch.randn(b, l, h, n, generator=gen).to(dtype)
    S0 = torch.randn(b, h, p, n, generator=gen)
    return x, dt, A, B, C, S0


@pytest.mark.parametrize("chunk", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("length", [1, 7, 8, 9, 16, 33])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_sequential(chunk, length, with_state):
    x, dt, A, B, C, S0 = inputs(l=length)
    S0 = S0 if with_state else None
    y_ref, s_ref = selective_scan_sequential(x, dt, A, B, C, S0)
    y, s = selective_scan_chunked(x, dt, A, B, C, chunk, S0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_chunked_bfloat16_inputs():
    x, dt, A, B, C, S0 = inputs(l=50, dtype=torch.bfloat16)
    y_ref, s_ref = selective_scan_sequential(x, dt, A, B, C, S0)
    y, s = selective_scan_chunked(x, dt, A, B, C, 16, S0)
    assert y.dtype == torch.float32 and s.dtype == torch.float32  # accumulation stays fp32
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)


def test_chunked_does_not_overflow_on_strong_decay():
    """Large dt * |A| over a long chunk: a cumulative-sum-of-logs form would divide by exp(-cum) and overflow."""
    x, dt, A, B, C, S0 = inputs(l=64)
    dt = dt * 50
    y_ref, s_ref = selective_scan_sequential(x, dt, A, B, C, S0)
    y, s = selective_scan_chunked(x, dt, A, B, C, 64, S0)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_chunked_stays_float32_under_autocast():
    x, dt, A, B, C, S0 = inputs(l=50)
    y_ref, s_ref = selective_scan_chunked(x, dt, A, B, C, 16, S0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = selective_scan_chunked(x, dt, A, B, C, 16, S0)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)


def test_step_equals_sequential():
    x, dt, A, B, C, S0 = inputs(l=12)
    y_ref, s_ref = selective_scan_sequential(x, dt, A, B, C, S0)
    state = S0.clone()
    ys = [selective_scan_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state) for t in range(12)]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, s_ref, rtol=1e-5, atol=1e-5)


def test_split_scan_carries_state():
    x, dt, A, B, C, _ = inputs(l=40)
    y_ref, s_ref = selective_scan_sequential(x, dt, A, B, C)
    y1, s1 = selective_scan_chunked(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], 8)
    y2, s2 = selective_scan_chunked(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], 8, s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 8, 64])
def test_documents_reset_the_state(chunk):
    """Packed documents: each document's outputs equal the document scanned alone (from zero, or from the initial
    state for the first one), whatever the chunk boundaries."""
    x, dt, A, B, C, S0 = inputs(l=30)
    bounds = [0, 5, 8, 21, 30]  # boundaries inside and at chunk edges
    doc = torch.cat([torch.full((b - a,), i) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]).expand(2, -1)
    y, s = selective_scan_chunked(x, dt, A, B, C, chunk, S0, doc=doc)
    y_seq, s_seq = selective_scan_sequential(x, dt, A, B, C, S0, doc=doc)
    torch.testing.assert_close(y, y_seq, rtol=1e-5, atol=1e-5)
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        alone, s_alone = selective_scan_sequential(x[:, a:b], dt[:, a:b], A, B[:, a:b], C[:, a:b], S0 if i == 0 else None)
        torch.testing.assert_close(y[:, a:b], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_doc", [False, True])
def test_chunked_gradients_equal_sequential(with_doc):
    """Training backpropagates through the chunked form: its gradients must be the recurrence's."""
    x, dt, A, B, C, S0 = inputs(l=29)
    doc = torch.tensor([[0] * 6 + [1] * 9 + [2] * 14, [0] * 20 + [1] * 9]) if with_doc else None
    grads = []
    for scan in (lambda *a: selective_scan_sequential(*a, doc=doc),
                 lambda *a: selective_scan_chunked(*a[:5], 5, a[5], doc=doc)):
        leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, S0)]
        y, s = scan(*leaves)
        (y.square().sum() + s.sin().sum()).backward()
        grads.append([t.grad for t in leaves])
    for g_chunked, g_ref in zip(*grads[::-1]):
        torch.testing.assert_close(g_chunked, g_ref, rtol=1e-4, atol=1e-4)
