"""The Mamba1 mixer as Zamba1 uses it (transformers' ZambaMambaMixer), exact to the published checkpoints.

Zamba1 splits d_inner into `n_mamba_heads` independent Mamba1 heads (Gu & Dao 2023, Algorithm 2): each head has its
own x_proj (x -> dt rank R, B, C) and dt_proj (R -> per-channel dt), and a per-channel A [p, n]:

    x, z   = in_proj(u)                      rows interleaved: channel c's x at row 2c, its gate z at row 2c+1
    x      = silu(causal depthwise conv(x))  on d_inner only
    dt_r, B, C = x_proj[h](x_h)              [R | N | N] per head
    dt     = softplus(dt_proj[h](dt_r) + dt_proj_bias[h])          per channel (no clamp, unlike Zamba2)
    y      = selective_scan(x, dt, A = -exp(A_log), B, C) + D * x
    out    = out_proj(y * silu(z))

Left padding (mask) is zeroed before in_proj and after the conv, and its dt is zero: the state neither decays nor
takes input there, so a padded row equals the row alone.

Legend: b batch, l sequence, h heads, p channels per head (d_inner = h p), n state size, r dt rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.layers import Linear
from .scan import selective_scan_chunked, selective_scan_step
from .zamba1_config import Zamba1Config
from .zamba2 import causal_conv, init_conv, inverse_softplus_dt


class Mamba1Mixer(nn.Module):
    def __init__(self, c: Zamba1Config):
        super().__init__()
        self.d_inner, self.heads, self.headdim = c.d_inner, c.n_mamba_heads, c.mamba_headdim
        self.state, self.rank = c.mamba_d_state, c.mamba_dt_rank
        h, p, n, r = self.heads, self.headdim, self.state, self.rank
        self.in_proj = Linear(c.hidden_size, 2 * c.d_inner, bias=c.mamba_proj_bias)  # rows [x0, z0, x1, z1, ...]
        self.conv1d = nn.Conv1d(c.d_inner, c.d_inner, c.mamba_d_conv, groups=c.d_inner, bias=c.mamba_conv_bias)
        self.x_proj_weight = nn.Parameter(torch.zeros(h, r + 2 * n, p))  # per head: x [p] -> [dt_r | B | C]
        self.dt_proj_weight = nn.Parameter(torch.zeros(h, p, r))  # per head: dt_r [r] -> dt [p]
        self.dt_proj_bias = nn.Parameter(torch.zeros(h, p))
        self.A_log = nn.Parameter(torch.zeros(h, p, n))  # A = -exp(A_log), per channel and state entry
        self.D = nn.Parameter(torch.ones(h, p))  # skip, per channel
        self.out_proj = Linear(c.d_inner, c.hidden_size, bias=c.mamba_proj_bias)

    @torch.no_grad()
    def init_weights(self, c: Zamba1Config, gen: torch.Generator | None) -> None:
        """The mixer's own parameters for training from scratch, as transformers' ZambaPreTrainedModel does (S4D-real
        A = 1..N per channel; dt log-uniform in [time_step_min, time_step_max])."""
        self.x_proj_weight.copy_(torch.randn(self.x_proj_weight.shape, generator=gen) * 0.02)
        bound = self.rank ** -0.5
        self.dt_proj_weight.copy_(torch.empty(self.dt_proj_weight.shape).uniform_(-bound, bound, generator=gen))
        self.dt_proj_bias.copy_(inverse_softplus_dt(c, self.dt_proj_bias.shape, gen))
        self.A_log.copy_(torch.log(torch.arange(1, self.state + 1, dtype=torch.float32)).expand_as(self.A_log))
        self.D.fill_(1.0)
        init_conv(self.conv1d, gen)

    def forward(self, u: Tensor, mask: Tensor | None, chunk_size: int, conv_state: Tensor | None = None,
                ssm_state: Tensor | None = None, doc: Tensor | None = None) -> Tensor:
        """u [b,l,d] -> [b,l,d]; continues from / updates conv_state [b,d_inner,k-1] and ssm_state [b,h,p,n]."""
        b, l, _ = u.shape
        if mask is not None:
            u = u * mask[..., None].to(u.dtype)
        x, z = self.in_proj(u).view(b, l, self.d_inner, 2).unbind(-1)  # [b,l,d_inner] each
        x = causal_conv(x.contiguous(), self.conv1d, conv_state, doc)
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        x = x.view(b, l, self.heads, self.headdim)  # [b,l,h,p]
        dbc = torch.einsum("blhp,hkp->blhk", x, self.x_proj_weight.to(x.dtype))  # [b,l,h,r+2n]
        dt, B, C = dbc.split([self.rank, self.state, self.state], dim=-1)
        dt = torch.einsum("blhr,hpr->blhp", dt, self.dt_proj_weight.to(dt.dtype))  # [b,l,h,p]
        dt = F.softplus(dt.float() + self.dt_proj_bias.float())
        if mask is not None:  # padding: no decay, no input
            dt = dt * mask[:, :, None, None]
        A = -torch.exp(self.A_log.float())  # [h,p,n]
        if ssm_state is not None and l == 1:
            y = selective_scan_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], ssm_state)[:, None]  # [b,1,h,p]
        else:
            y, final = selective_scan_chunked(x, dt, A, B, C, chunk_size, initial_state=ssm_state, doc=doc)
            if ssm_state is not None:
                ssm_state.copy_(final)
        y = (y + x.float() * self.D.float()) * F.silu(z.float()).view(b, l, self.heads, self.headdim)
        return self.out_proj(y.reshape(b, l, self.d_inner).to(u.dtype))
