"""The Mamba2 selective scan (SSD, "state space duality"), in plain PyTorch.

Three forms with one contract (inputs already discretised: dt after softplus and clamping):

    y[t] = C[t] . S[t],   S[t] = exp(dt[t] A) S[t-1] + dt[t] x[t] (x) B[t],   S[-1] = initial_state

- `ssd_sequential`: the recurrence above, one step at a time. Slow and obviously correct: the reference.
- `ssd_chunked`: the chunked algorithm of the Mamba2 paper (Dao & Gu 2024, section 6 / `ssd_minimal`):
  within a chunk the scan is a masked, decayed attention (matmuls); between chunks the state is carried.
  Working memory is O(chunk^2 * heads), independent of the sequence length, and B/C are never repeated
  from groups to heads (each group's C.B product is computed once).
- `ssd_step`: one decode step that updates the state in place.

All accumulate in float32 whatever the input dtype; the state is float32.

Packed training sequences pass `doc` [b,l], a document index per position: where it changes the state
is reset, so documents packed into one row do not see each other (the initial state, if any, belongs to
the document of the first position).

Legend: b batch, l sequence, q/s positions inside a chunk, h heads, g groups (h = g * k), k heads per
group, p head dim, n state size.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ssd_sequential(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   initial_state: Tensor | None = None, doc: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [b,l,h,p], dt [b,l,h], A [h], B/C [b,l,g,n], initial_state [b,h,p,n] -> (y [b,l,h,p] fp32, state)."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    x, dt, A = x.float(), dt.float(), A.float()
    Bh = B.float().repeat_interleave(h // g, dim=2)  # [b,l,h,n]: head i uses group i // (h/g)
    Ch = C.float().repeat_interleave(h // g, dim=2)
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.float().clone()
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # [b,h,1,1]
        if doc is not None and t > 0:
            decay = decay * (doc[:, t] == doc[:, t - 1]).view(b, 1, 1, 1)  # new document: forget
        inp = (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]  # [b,h,p,n]
        state = decay * state + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p)
    return y, state


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                initial_state: Tensor | None = None, doc: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as `ssd_sequential`; exact for any chunk_size."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    k = h // g
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    a = dt * A.float()  # [b,l,h] log-decay per step (<= 0)
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.float().clone()
    state_doc = doc[:, 0] if doc is not None else None  # document the carried state belongs to
    ys = []
    for s0 in range(0, l, chunk_size):
        s1 = min(s0 + chunk_size, l)
        q = s1 - s0
        cum = a[:, s0:s1].cumsum(1).transpose(1, 2)  # [b,h,q] decay from chunk start to t (inclusive)
        dtc = dt[:, s0:s1].transpose(1, 2)  # [b,h,q]
        Bc = B[:, s0:s1].transpose(1, 2)  # [b,g,q,n]
        Cc = C[:, s0:s1].transpose(1, 2)  # [b,g,q,n]
        xc = x[:, s0:s1].permute(0, 2, 1, 3).reshape(b, g, k, q, p)  # [b,g,k,q,p]

        # 1. inside the chunk: y_i = sum_{j<=i} (C_i.B_j) exp(cum_i - cum_j) dt_j x_j
        seg = cum[..., :, None] - cum[..., None, :]  # [b,h,q,s]
        causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
        if doc is not None:
            dc = doc[:, s0:s1]  # [b,q]
            causal = causal & (dc[:, :, None] == dc[:, None, :])[:, None]  # [b,1,q,s]: same document only
        decay = torch.exp(seg.masked_fill(~causal, float("-inf")))  # zero above the diagonal, no inf*0
        CB = Cc @ Bc.transpose(-1, -2)  # [b,g,q,s], once per group
        M = CB[:, :, None] * (decay * dtc[:, :, None, :]).view(b, g, k, q, q)  # [b,g,k,q,s]
        y = M @ xc  # [b,g,k,q,p]

        # 2. the state carried in from earlier chunks, decayed to each position
        S = state.view(b, g, k, p, n)
        y_in = (Cc[:, :, None] @ S.transpose(-1, -2)) * torch.exp(cum).view(b, g, k, q, 1)
        if doc is not None:
            y_in = y_in * (dc == state_doc[:, None]).view(b, 1, 1, q, 1)
        y = y + y_in

        # 3. the state at the end of this chunk
        w = (torch.exp(cum[..., -1:] - cum) * dtc).view(b, g, k, q, 1)  # decay of each input to chunk end
        carry = torch.exp(cum[..., -1])[..., None, None]  # [b,h,1,1]
        if doc is not None:  # only the document still open at the chunk end is carried on
            w = w * (dc == dc[:, -1:]).view(b, 1, 1, q, 1)
            carry = carry * (dc[:, -1] == state_doc).view(b, 1, 1, 1)
            state_doc = dc[:, -1]
        new = (xc * w).transpose(-1, -2) @ Bc[:, :, None]  # [b,g,k,p,q] @ [b,g,1,q,n] -> [b,g,k,p,n]
        state = state * carry + new.view(b, h, p, n)
        ys.append(y.view(b, h, q, p))
    y = torch.cat(ys, dim=2).transpose(1, 2) if ys else x.new_zeros(b, h, 0, p).transpose(1, 2)
    return y, state  # y [b,l,h,p]


def ssd_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor) -> Tensor:
    """One token. x [b,h,p], dt [b,h], B/C [b,g,n]; `state` [b,h,p,n] fp32 is updated in place -> y [b,h,p]."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    k = h // g
    dt = dt.float()
    S = state.view(b, g, k, p, n)
    decay = torch.exp(dt * A.float()).view(b, g, k, 1, 1)
    xdt = (x.float() * dt[..., None]).view(b, g, k, p, 1)
    S.mul_(decay).add_(xdt * B.float().view(b, g, 1, 1, n))
    y = S @ C.float().view(b, g, 1, n, 1)  # [b,g,k,p,1]
    return y.view(b, h, p)
