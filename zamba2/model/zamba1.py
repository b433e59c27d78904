"""The Zamba1 hybrid language model (Zyphra, arXiv 2405.16712), exact to Zyphra/Zamba-7B-v1 and transformers'
ZambaForCausalLM.

Zamba2's wiring with Zamba1's parts: a stack of Mamba1 layers (mamba1.py); at the hybrid layers one shared
attention + MLP block reads concat(hidden, original embeddings) and, through the layer's own D x D linear, adds to
the Mamba layer's input (not to the residual):

    x = E = embed(ids)
    for layer i:  u = x + linear_i(shared(concat(x, E)))   if i is hybrid, else x
                  x = x + Mamba1_i(RMSNorm_i(u))
    logits = RMSNorm_final(x) @ embed.T

What differs from Zamba2, and lives here or in mamba1.py: the mixer; one shared block and no per-visit adapters;
an MLP with separate gate_proj and up_proj; no RoPE. Everything else (the shared attention with its
(head_dim/2)^-0.5 scale, layers, padding masks, packed-document boundaries, the cache) is zamba2.py's and cache.py's.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..ops.layers import Linear
from .mamba1 import Mamba1Mixer
from .zamba1_config import Zamba1Config
from .zamba2 import ACTIVATIONS, Zamba2LM


class GatedMLP(nn.Module):
    """down(act(gate(g)) * up(g)), Zamba1's shared MLP (Zamba2 fuses gate and up into one projection)."""

    def __init__(self, c: Zamba1Config):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, g: Tensor, adapter: None) -> Tensor:  # SharedBlock passes the visit's adapter: None in Zamba1
        return self.down_proj(self.act(self.gate_proj(g)) * self.up_proj(g))


class Zamba1LM(Zamba2LM):
    """Zamba2LM's forward, cache and API (generate, stream, serving, training) over Zamba1's layers."""

    mixer = Mamba1Mixer
    mlp = GatedMLP
