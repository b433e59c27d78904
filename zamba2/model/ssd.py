"""The Mamba2 selective scan (SSD, "state space duality"), in plain PyTorch.

Three forms with one contract (inputs already discretised: dt after softplus and clamping):

    y[t] = C[t] . S[t],   S[t] = exp(dt[t] A) S[t-1] + dt[t] x[t] (x) B[t],   S[-1] = initial_state

- `ssd_sequential`: the recurrence above, one step at a time. Slow and obviously correct: the reference.
- `ssd_chunked`: the chunked algorithm of the Mamba2 paper (Dao & Gu 2024, section 6 / `ssd_minimal`):
  within a chunk the scan is a masked, decayed attention (matmuls); between chunks the state is
  passed by one small matmul over chunks. Working memory is O(length * chunk * heads): callers bound
  it by feeding long prompts in pieces (generate does). B/C are never repeated from groups to heads
  (each group's C.B product is computed once).
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
import torch.nn.functional as F
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


BLOCK = 512  # tokens scanned at once: the [h, chunks, q, q] temporaries of a block stay cache-sized


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                initial_state: Tensor | None = None, doc: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as `ssd_sequential`; exact for any chunk_size.

    The whole chunks of a block of about BLOCK tokens are computed at once (no loop over chunks);
    blocks pass the state on. All of 2048 tokens at once ran its elementwise work 6x slower per token
    than blocks of 512 on the 2-core machine (the temporaries left the cache). On a GPU, where each op is a
    kernel launch and memory is plentiful, the whole sequence is one block. A last partial chunk
    is a call of its own.
    """
    b, l, h, p = x.shape
    state = x.new_zeros(b, h, p, B.shape[3], dtype=torch.float32) if initial_state is None \
        else initial_state.float()
    if l == 0:
        return x.new_zeros(b, 0, h, p, dtype=torch.float32), state.clone()
    q = min(chunk_size, l)
    block = max(q, BLOCK // q * q) if x.device.type == "cpu" else l
    state_doc = doc[:, 0] if doc is not None else None  # the document the carried state belongs to
    ys = []
    with torch.autocast(x.device.type, enabled=False):  # mixed-precision training too: the scan stays float32
        for s0 in range(0, l, block):
            s1 = min(s0 + block, l)
            whole = s0 + (s1 - s0) // q * q
            for lo, hi in ((s0, whole), (whole, s1)):
                if lo == hi:
                    continue
                piece = doc[:, lo:hi] if doc is not None else None
                y, state = _chunks(x[:, lo:hi], dt[:, lo:hi], A, B[:, lo:hi], C[:, lo:hi], min(q, hi - lo), state,
                                   piece, state_doc)
                if doc is not None:
                    state_doc = doc[:, hi - 1]
                ys.append(y)
    return torch.cat(ys, dim=1), state


def _chunks(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, q: int, state: Tensor,
            doc: Tensor | None, state_doc: Tensor | None) -> tuple[Tensor, Tensor]:
    """The SSD over l = c*q positions in c chunks of q, computed for all chunks at once."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    k, c = h // g, l // q
    dtc = dt.float().view(b, c, q, h).permute(0, 3, 1, 2)  # [b,h,c,q]
    cum = (dtc * A.float()[:, None, None]).cumsum(-1)  # [b,h,c,q] log-decay from chunk start to t (inclusive)
    Bc = B.float().view(b, c, q, g, n).permute(0, 3, 1, 2, 4)  # [b,g,c,q,n]
    Cc = C.float().view(b, c, q, g, n).permute(0, 3, 1, 2, 4)  # [b,g,c,q,n]
    xc = x.float().view(b, c, q, g, k, p).permute(0, 3, 4, 1, 2, 5)  # [b,g,k,c,q,p]
    dc = doc.view(b, c, q) if doc is not None else None

    # 1. inside each chunk: y_i = sum_{j<=i} (C_i.B_j) exp(cum_i - cum_j) dt_j x_j
    keep = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    if dc is not None:
        keep = keep & (dc[..., :, None] == dc[..., None, :])[:, None]  # [b,1,c,q,s]: same document only
    decay = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~keep, float("-inf")))  # [b,h,c,q,s]
    CB = Cc @ Bc.transpose(-1, -2)  # [b,g,c,q,s], once per group
    y = (CB[:, :, None] * (decay * dtc[..., None, :]).view(b, g, k, c, q, q)) @ xc  # [b,g,k,c,q,p]

    # 2. the state each chunk adds by its end, starting from zero
    w = torch.exp(cum[..., -1:] - cum) * dtc  # [b,h,c,q] decay of each input to its chunk's end
    log_carry = cum[..., -1]  # [b,h,c] how the state entering a chunk decays across it
    if dc is not None:
        w = w * (dc == dc[..., -1:])[:, None]  # only the document open at the chunk end is carried on
        doc_in = torch.cat([state_doc[:, None], dc[:, :-1, -1]], dim=1)  # [b,c] document entering each chunk
        log_carry = log_carry.masked_fill((dc[..., -1] != doc_in)[:, None], float("-inf"))
    own = (xc * w.view(b, g, k, c, q, 1)).transpose(-1, -2) @ Bc[:, :, None]  # [b,g,k,c,p,n]

    # 3. the states entering chunks 0..c (c = the final state), as one matmul over chunks:
    #    S_in[z] = sum_{j<=z} (prod_{j<=m<z} carry_m) src[j],  src = [initial state, own_0, ..., own_{c-1}]
    src = torch.cat([state[:, :, None], own.reshape(b, h, c, p, n)], dim=2).view(b, h, c + 1, p * n)
    S_in = (torch.exp(_segsum(F.pad(log_carry, (1, 0)))) @ src).view(b, h, c + 1, p, n)

    # 4. the entering state, decayed to each position
    y_in = (Cc[:, :, None] @ S_in[:, :, :c].reshape(b, g, k, c, p, n).transpose(-1, -2))  # [b,g,k,c,q,p]
    y_in = y_in * torch.exp(cum).view(b, g, k, c, q, 1)
    if dc is not None:
        y_in = y_in * (dc == doc_in[..., None]).view(b, 1, 1, c, q, 1)
    y = (y + y_in).permute(0, 3, 4, 1, 2, 5).reshape(b, l, h, p)
    return y, S_in[:, :, c]


def _segsum(v: Tensor) -> Tensor:
    """v [..., T] -> [..., T, T] with out[i, j] = sum_{j < m <= i} v[m], and -inf above the diagonal.

    Summed directly rather than as a difference of cumsums, so -inf entries (document resets) give
    -inf (a zero decay) instead of nan.
    """
    T = v.shape[-1]
    tri = torch.ones(T, T, dtype=torch.bool, device=v.device)
    v = v[..., None].expand(*v.shape, T).masked_fill(~tri.tril(-1), 0)  # [m, j] = v[m] where m > j
    return v.cumsum(-2).masked_fill(~tri.tril(), float("-inf"))


def ssd_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor) -> Tensor:
    """One token. x [b,h,p], dt [b,h], B/C [b,g,n]; `state` [b,h,p,n] fp32 is updated in place -> y [b,h,p].

    Three batched ops over (batch, group): decay, rank-1 update, read-out. Broadcasting elementwise forms
    of the same update ran ~10x slower on CPU in measurements (decode is dominated by per-op cost).
    """
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    dt = dt.float()
    state.mul_(torch.exp(dt * A.float())[..., None, None])
    S = state.view(b * g, (h // g) * p, n)  # the heads of a group share B and C
    S.baddbmm_((x.float() * dt[..., None]).reshape(b * g, -1, 1), B.float().reshape(b * g, 1, n))
    return torch.bmm(S, C.float().reshape(b * g, n, 1)).view(b, h, p)
