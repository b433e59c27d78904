"""The Mamba1 selective scan (Gu & Dao 2023, "Mamba", Algorithm 2), in plain PyTorch, as Zamba1 uses it.

Three forms with one contract (inputs already discretised: dt after softplus):

    S[t] = exp(dt[t] A) * S[t-1] + (dt[t] x[t]) B[t],   y[t] = S[t] . C[t],   S[-1] = initial_state

Unlike Mamba2's SSD (ssd.py) the decay is per channel and per state entry (A is [h,p,n], not one scalar per
head), so the scan does not reduce to a masked attention over a head; it stays an elementwise linear recurrence.

- `selective_scan_sequential`: the recurrence above, one step at a time. Slow and obviously correct: the reference.
- `selective_scan_chunked`: the same recurrence in chunks of q positions. Inside a chunk every position's state
  is computed at once by a log-depth (Hillis-Steele) scan over the pairs (decay, input) with the associative
  combine (a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2); the chunk's first state is then added, decayed by the
  cumulative product of decays. Work and memory are O(q log q) and O(q) states per chunk, whatever the length;
  the state is carried from chunk to chunk. Every factor is a decay <= 1, so nothing overflows (a cumulative
  sum of log-decays divided out, exp(-cum), would for long chunks).
- `selective_scan_step`: one decode step that updates the state in place.

All accumulate in float32 whatever the input dtype; the state is float32.

Packed training sequences pass `doc` [b,l], a document index per position: where it changes the decay is zero,
so the state restarts (the initial state, if any, belongs to the document of the first position).

Legend: b batch, l sequence, q positions in a chunk, h heads, p channels per head, n state size.
Shapes: x, dt [b,l,h,p]; A [h,p,n]; B, C [b,l,h,n] (each head has its own B and C); state [b,h,p,n].
"""

from __future__ import annotations

import torch
from torch import Tensor


def _decays(dt: Tensor, A: Tensor, doc: Tensor | None, prev_doc: Tensor | None) -> Tensor:
    """dt [b,l,h,p] fp32, A [h,p,n] -> exp(dt A) [b,l,h,p,n], zero where a new document starts."""
    a = torch.exp(dt[..., None] * A.float())
    if doc is not None:  # the document before each position (the first one's own at the very start: no reset)
        before = torch.cat([doc[:, :1] if prev_doc is None else prev_doc[:, None], doc[:, :-1]], dim=1)
        a = a * (doc == before)[:, :, None, None, None]
    return a


def selective_scan_sequential(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                              initial_state: Tensor | None = None, doc: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x, dt [b,l,h,p], A [h,p,n], B/C [b,l,h,n], initial_state [b,h,p,n] -> (y [b,l,h,p] fp32, final state)."""
    b, l, h, p = x.shape
    n = A.shape[-1]
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.float().clone()
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t, ..., None] * A.float())  # [b,h,p,n]
        if doc is not None and t > 0:
            decay = decay * (doc[:, t] == doc[:, t - 1]).view(b, 1, 1, 1)  # new document: forget
        state = decay * state + (dt[:, t] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((state * C[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p)
    return y, state


def selective_scan_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                           initial_state: Tensor | None = None, doc: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as `selective_scan_sequential`; exact for any chunk_size."""
    b, l, h, p = x.shape
    state = x.new_zeros(b, h, p, A.shape[-1], dtype=torch.float32) if initial_state is None \
        else initial_state.float().clone()
    ys = []
    with torch.autocast(x.device.type, enabled=False):  # mixed-precision training too: the scan stays float32
        for s in range(0, l, chunk_size):
            e = min(s + chunk_size, l)
            prev_doc = doc[:, s - 1] if doc is not None and s > 0 else None
            a = _decays(dt[:, s:e].float(), A, doc[:, s:e] if doc is not None else None, prev_doc)  # [b,q,h,p,n]
            u = (dt[:, s:e].float() * x[:, s:e].float())[..., None] * B[:, s:e, :, None, :].float()  # [b,q,h,p,n]
            a, u = _scan(a, u)  # a: decay from the chunk start to each position; u: state from zero
            states = torch.addcmul(u, a, state[:, None])  # [b,q,h,p,n] with the carried state
            ys.append(torch.einsum("bqhpn,bqhn->bqhp", states, C[:, s:e].float()))
            state = states[:, -1]
    y = torch.cat(ys, dim=1) if ys else x.new_zeros(b, 0, h, p, dtype=torch.float32)
    return y, state


def _scan(a: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Inclusive scan over dim 1 of the pairs (a, u) [b,q,...] under (a1,u1).(a2,u2) = (a1 a2, a2 u1 + u2), in
    log2(q) doubling steps (Hillis-Steele): after the step with offset k each position holds the product of the
    last 2k pairs."""
    q, k = a.shape[1], 1
    while k < q:
        u = torch.cat([u[:, :k], torch.addcmul(u[:, k:], a[:, k:], u[:, :-k])], dim=1)
        a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], dim=1)
        k *= 2
    return a, u


def selective_scan_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor) -> Tensor:
    """One token. x, dt [b,h,p], B/C [b,h,n]; `state` [b,h,p,n] fp32 is updated in place -> y [b,h,p] fp32."""
    dt = dt.float()
    state.mul_(torch.exp(dt[..., None] * A.float()))
    state.addcmul_((dt * x.float())[..., None], B.float()[:, :, None, :])
    return torch.einsum("bhpn,bhn->bhp", state, C.float())
