"""The Zamba2 hybrid language model (Zyphra, arXiv 2411.15242), exact to the published checkpoints.

A stack of Mamba2 layers; at the "hybrid" layers a shared transformer block (attention + gated MLP,
no internal residuals) first reads concat(hidden, original embeddings), and its output, through a
per-layer D x D linear, is added to the Mamba layer's *input* (not to the residual):

    x = E = embed(ids)
    for layer i:  u = x + linear_i(shared[j % nmem](concat(x, E)))   if i is the j-th hybrid layer, else x
                  x = x + Mamba2_i(RMSNorm_i(u))
    logits = RMSNorm_final(x) @ embed.T

Each hybrid visit j has its own rank-r adapters (LoRA-shaped, part of the base model, no scaling) on
the shared q/k/v and gate_up projections. `shared_blocks` is the single owner of the shared weights;
a hybrid layer holds only its block index, its adapters and its linear.

Zamba1 (zamba1.py) is this model with other parts: Zamba2LM's `mixer` and `mlp` class attributes name them.

Legend: b batch, l/t sequence, d hidden, h heads, p head dim, n state size, g groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.layers import Linear, RMSNorm, linear
from ..ops.mixer import mamba_mixer
from .cache import HybridCache
from .config import Config
from .ssd import ssd_chunked, ssd_step


# The scan's chunk length on the CPU is at most this (the config's chunk_size, 256 in the released models,
# elsewhere). The chunked scan is exact for any length; its intra-chunk work grows with the chunk, and on the
# 2-core AVX2 machine 64 ran prefill 1.2-1.5x and training 1.1-1.3x faster than 256 (bench/compare.py).
CPU_MAX_CHUNK = 64


def adapter(d_in: int, rank: int, d_out: int) -> nn.Sequential:
    """Rank-r down/up pair applied to the same input as the base projection and summed, unscaled."""
    return nn.Sequential(Linear(d_in, rank, bias=False), Linear(rank, d_out, bias=False))


def causal_conv(xBC: Tensor, conv1d: nn.Conv1d, conv_state: Tensor | None, doc: Tensor | None = None) -> Tensor:
    """Depthwise causal conv + SiLU over xBC [b,l,c]; continues from / updates conv_state [b,c,k-1] (both mixers).

    Computed as k shifted multiply-adds over the [b,l,c] rows rather than F.conv1d over [b,c,l]: in training,
    conv1d's and SiLU's backward on the transposed layout cost about twice as much (forward + backward of
    2048 x 1152 rows: 52 vs 24 ms), and packed documents need the taps anyway.
    """
    b, l, _ = xBC.shape
    k = conv1d.kernel_size[0]
    bias = conv1d.bias
    if conv_state is not None and l == 1:  # decode: a k-tap dot product per channel
        full = torch.cat([conv_state, xBC.transpose(1, 2)], dim=-1)  # [b,c,k]
        conv_state.copy_(full[..., 1:])
        out = (full * conv1d.weight[:, 0]).sum(-1)  # [b,c]
        return F.silu(out if bias is None else out + bias)[:, None]  # [b,1,c]
    w = conv1d.weight[:, 0].t().float().contiguous()  # [k,c]: tap j reads position t - (k-1) + j
    past = xBC.new_zeros(b, k - 1, xBC.shape[2]) if conv_state is None else conv_state.transpose(1, 2)
    full = torch.cat([past, xBC], dim=1)  # [b,k-1+l,c]
    if conv_state is not None:
        conv_state.copy_(full[:, l:].transpose(1, 2))  # the last k-1 rows
    full = full.float()  # the taps sum in float32 (as conv1d and the compiled prefill do), one rounding after
    out = torch.zeros_like(w[0]) if bias is None else bias.float()
    for j in range(k):
        tap = full[:, j:j + l]  # [b,l,c]
        if doc is not None and j < k - 1:  # packed documents: a tap looking back across a boundary is dropped
            tap = tap * (doc == F.pad(doc, (k - 1 - j, 0), value=-1)[:, :l])[..., None]
        out = torch.addcmul(out, tap, w[j])
    return F.silu(out).to(torch.promote_types(xBC.dtype, conv1d.weight.dtype))  # float32 under autocast


def inverse_softplus_dt(c, shape: tuple, gen: torch.Generator | None) -> Tensor:
    """softplus^-1(dt), dt log-uniform in [time_step_min, time_step_max] (floored): the dt bias init of Mamba."""
    u = torch.rand(shape, generator=gen)
    dt = torch.exp(u * (math.log(c.time_step_max) - math.log(c.time_step_min)) + math.log(c.time_step_min))
    dt = dt.clamp(min=c.time_step_floor)
    return dt + torch.log(-torch.expm1(-dt))


def init_conv(conv1d: nn.Conv1d, gen: torch.Generator | None) -> None:
    bound = 1 / math.sqrt(conv1d.weight.shape[-1])
    conv1d.weight.uniform_(-bound, bound, generator=gen)
    if conv1d.bias is not None:
        conv1d.bias.uniform_(-bound, bound, generator=gen)


class Mamba2Mixer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.d_inner, self.conv_dim = c.d_inner, c.conv_dim
        self.heads, self.headdim, self.groups, self.state = c.n_mamba_heads, c.mamba_headdim, c.mamba_ngroups, c.mamba_d_state
        self.dt_min = c.time_step_min
        self.in_proj = Linear(c.hidden_size, c.in_proj_size, bias=c.add_bias_linear)  # rows [z, x, B, C, dt]
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.mamba_d_conv, groups=c.conv_dim, bias=c.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(c.n_mamba_heads))
        self.A_log = nn.Parameter(torch.zeros(c.n_mamba_heads))  # A = -exp(A_log), one scalar per head
        self.D = nn.Parameter(torch.ones(c.n_mamba_heads))  # skip, per head
        self.norm = RMSNorm(c.d_inner, eps=1e-5, group_size=c.d_inner // c.mamba_ngroups)  # eps fixed in Mamba2
        self.out_proj = Linear(c.d_inner, c.hidden_size, bias=c.add_bias_linear)

    def forward(self, u: Tensor, mask: Tensor | None, chunk_size: int, conv_state: Tensor | None = None,
                ssm_state: Tensor | None = None, doc: Tensor | None = None) -> Tensor:
        b, l, _ = u.shape
        if mask is not None:  # padding contributes nothing (and, with dt = 0 below, does not decay the state)
            u = u * mask[..., None].to(u.dtype)
        zx = self.in_proj(u)  # [b,l, z | xBC | dt]
        if mask is None and doc is None:  # compiled kernels where they run (ops/mixer.py); the code below is their reference
            if (y := mamba_mixer(self, zx, conv_state, ssm_state, chunk_size)) is not None:
                return self.out_proj(y)
        z, xBC, dt = zx.split([self.d_inner, self.conv_dim, self.heads], dim=-1)
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)
        xBC = causal_conv(xBC, self.conv1d, conv_state, doc)
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)
        x, B, C = xBC.split([self.d_inner, self.groups * self.state, self.groups * self.state], dim=-1)
        # dt: softplus then clamp at time_step_min, as transformers does in prefill (we do it in decode too,
        # so that step-by-step decoding equals the parallel forward)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(min=self.dt_min)  # [b,l,h]
        if mask is not None:
            dt = dt * mask[..., None]
        A = -torch.exp(self.A_log.float())
        x = x.reshape(b, l, self.heads, self.headdim)
        B = B.reshape(b, l, self.groups, self.state)
        C = C.reshape(b, l, self.groups, self.state)
        if ssm_state is not None and l == 1:
            y = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], ssm_state)[:, None]  # [b,1,h,p]
        else:
            y, final = ssd_chunked(x, dt, A, B, C, chunk_size, initial_state=ssm_state, doc=doc)
            if ssm_state is not None:
                ssm_state.copy_(final)
        y = y + x.float() * self.D.float()[:, None]  # D skip on the post-conv x
        y = self.norm(y.reshape(b, l, self.d_inner), gate=z)
        return self.out_proj(y.to(u.dtype))

    @torch.no_grad()
    def init_weights(self, c: Config, gen: torch.Generator | None) -> None:
        """The mixer's own parameters, for training from scratch (Zamba2LM.init_weights does the projections)."""
        # dt ~ log-uniform in [time_step_min, time_step_max]; dt_bias = softplus^-1(dt)
        self.dt_bias.copy_(inverse_softplus_dt(c, (c.n_mamba_heads,), gen))
        self.A_log.copy_(torch.log(torch.empty(c.n_mamba_heads).uniform_(1, 16, generator=gen)))
        self.D.fill_(1.0)
        init_conv(self.conv1d, gen)

    def step_params(self) -> tuple:
        """What the compiled kernels read of this mixer (ops/mixer.py, ops/decode.py), in their argument order."""
        return (self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log, self.D, self.norm.weight,
                self.groups, self.dt_min, self.norm.eps)


class SharedAttention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        A, hd = c.attention_hidden_size, c.attention_head_dim
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, hd
        self.q_proj = Linear(A, self.heads * hd, bias=False)
        self.k_proj = Linear(A, self.kv_heads * hd, bias=False)
        self.v_proj = Linear(A, self.kv_heads * hd, bias=False)
        self.o_proj = Linear(self.heads * hd, c.hidden_size, bias=False)
        # Zamba scales by (head_dim/2)^-0.5: the original code derives it from kv_channels = D / heads,
        # while the real head dim is 2D / heads (the input is the 2D-wide concatenation).
        self.scale = (hd / 2) ** -0.5

    def forward(self, h: Tensor, visit: "Layer", ctx: Context) -> Tensor:
        """Normalised concat(hidden, embeddings) h [b,t,2d] -> [b,t,d]; the KV cached under the visiting layer."""
        b, t, _ = h.shape
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        if visit.q_adapter is not None:
            q, k, v = q + visit.q_adapter(h), k + visit.k_adapter(h), v + visit.v_adapter(h)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # [b,heads,t,hd]
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # [b,kv,t,hd]
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        if ctx.cache is not None:
            k, v = ctx.cache.write_kv(visit.index, ctx.start, k, v)  # [b,kv,past+t,hd]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.attn_mask, is_causal=ctx.causal,
                                           scale=self.scale, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(a.transpose(1, 2).reshape(b, t, -1))  # [b,t,d]


ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh")}


class SharedMLP(nn.Module):
    ACTS = ("gelu", "silu", "gelu_pytorch_tanh")  # the decode kernel's act codes, in order

    def __init__(self, c: Config):
        super().__init__()
        self.act_code = self.ACTS.index(c.hidden_act)
        self.gate_up_proj = Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.add_bias_linear)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=c.add_bias_linear)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, g: Tensor, adapter: nn.Module | None) -> Tensor:
        gu = self.gate_up_proj(g)  # [b,t,2f]: gate rows, then up rows
        if adapter is not None:
            gu = gu + adapter(g)
        gate, up = gu.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class SharedBlock(nn.Module):
    """Attention + gated MLP on concat(hidden, embeddings) [b,t,2d] -> [b,t,d], with no internal residuals."""

    def __init__(self, c: Config, mlp: type[nn.Module] = SharedMLP):
        super().__init__()
        self.input_layernorm = RMSNorm(c.attention_hidden_size, c.rms_norm_eps)  # one RMS over all 2D features
        self.self_attn = SharedAttention(c)
        self.pre_ff_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.feed_forward = mlp(c)

    def forward(self, hcat: Tensor, visit: "Layer", ctx: Context) -> Tensor:
        o = self.self_attn(self.input_layernorm(hcat), visit, ctx)
        return self.feed_forward(self.pre_ff_layernorm(o), visit.mlp_adapter)


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype) -> tuple[Tensor, Tensor]:
    """GPT-NeoX style (rotate-half) RoPE over the full head dim. positions [b,t] -> cos, sin [b,1,t,hd]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions[..., None].float() * inv_freq  # [b,t,hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Layer(nn.Module):
    """Pre-norm Mamba layer; a hybrid layer also owns its linear and adapters for its shared-block visit."""

    def __init__(self, c: Config, index: int, mixer: type[nn.Module] = Mamba2Mixer):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mamba = mixer(c)
        self.visit = c.hybrid_layer_ids.index(index) if index in c.hybrid_layer_ids else None
        self.block = None if self.visit is None else self.visit % c.num_mem_blocks  # round-robin ABAB...
        self.q_adapter = self.k_adapter = self.v_adapter = self.mlp_adapter = None
        if self.visit is not None:
            self.linear = Linear(c.hidden_size, c.hidden_size, bias=False)
            A, hd = c.attention_hidden_size, c.attention_head_dim
            if c.use_shared_attention_adapter:
                self.q_adapter = adapter(A, c.adapter_rank, c.num_attention_heads * hd)
                self.k_adapter = adapter(A, c.adapter_rank, c.num_key_value_heads * hd)
                self.v_adapter = adapter(A, c.adapter_rank, c.num_key_value_heads * hd)
            if c.use_shared_mlp_adapter:
                self.mlp_adapter = adapter(c.hidden_size, c.adapter_rank, 2 * c.intermediate_size)

    def forward(self, x: Tensor, ctx: Context, shared: nn.ModuleList) -> Tensor:
        cache = ctx.cache
        conv = cache.conv[self.index] if cache is not None else None
        ssm = cache.ssm[self.index] if cache is not None else None
        u = x
        if self.visit is not None:
            u = x + self.linear(shared[self.block](torch.cat([x, ctx.embeddings], dim=-1), self, ctx))
        return x + self.mamba(self.input_layernorm(u), ctx.mask, ctx.chunk_size, conv, ssm, ctx.doc)  # residual is x, not u


@dataclass
class Context:
    """What every layer of one forward shares (built by Zamba2LM.forward, and by infer/graphs.py for a graph step)."""

    embeddings: Tensor  # [b,t,d] the original embeddings, which every shared-block visit reads
    chunk_size: int  # the scan's chunk length
    mask: Tensor | None = None  # [b,t] False for left padding
    attn_mask: Tensor | None = None  # [b,1,t,past+t] or [t,past+t], True = attend; None with `causal` or one query
    causal: bool = False
    rope: tuple[Tensor, Tensor] | None = None  # (cos, sin) [b,1,t,hd]
    cache: HybridCache | None = None
    start: int | None = 0  # the first KV slot of these tokens
    doc: Tensor | None = None  # [b,t] document index of packed training sequences


class Zamba2LM(nn.Module):
    quantized: str | None = None  # "int8" after quant.quantize_int8: inference only, not savable
    mixer: type[nn.Module] = Mamba2Mixer  # what each layer's mixer and the shared blocks' MLP are (Zamba1LM's differ)
    mlp: type[nn.Module] = SharedMLP

    def __init__(self, config: Config):
        super().__init__()
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c, i, self.mixer) for i in range(c.num_hidden_layers))
        self.shared_blocks = nn.ModuleList(SharedBlock(c, self.mlp) for _ in range(c.num_mem_blocks))
        self.final_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = None if c.tie_word_embeddings else Linear(c.hidden_size, c.vocab_size, bias=False)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialisation for training from scratch (Mamba2 / transformers conventions)."""
        c = self.config
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.02)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        for layer in self.layers:
            # out_proj scaled by 1/sqrt(2L) so the residual stream does not grow with depth (GPT-2 / Mamba)
            layer.mamba.out_proj.weight.mul_(1 / math.sqrt(2 * c.num_hidden_layers))
            layer.mamba.init_weights(c, gen)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor] | None:
        """(cos, sin) [b,1,t,hd] at positions [b,t] (forward, and the decode steps of infer/), or None without RoPE."""
        c = self.config
        return rope_tables(positions, c.attention_head_dim, c.effective_rope_theta, self.dtype) if c.use_mem_rope else None

    def new_cache(self, batch_size: int, capacity: int = 0) -> HybridCache:
        return HybridCache(self.config, batch_size, self.device, self.dtype, capacity)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: HybridCache | None = None,
                logits_to_keep: int = 0, doc_ids: Tensor | None = None) -> Tensor:
        """input_ids [b,t] -> logits [b,t,vocab] (only the last `logits_to_keep` positions if > 0).

        attention_mask [b,t] (or [b, past+t]): 1 for tokens, 0 for left padding. With `cache`, the
        forward continues from the cached state (any number of new tokens) and updates it in place.
        doc_ids [b,t] (training on packed documents): a document index per position, nondecreasing;
        each document is computed as if alone (SSM and conv state reset, attention within the
        document, RoPE positions restarting at 0).
        """
        c = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= c.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= c.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {c.vocab_size})")
        if cache is not None and cache.batch_size != b:
            raise ValueError(f"cache holds {cache.batch_size} sequences but input_ids has {b}")
        mask = None
        if attention_mask is not None:
            if attention_mask.shape[0] != b or attention_mask.shape[1] < t:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not fit input_ids {(b, t)}")
            mask = attention_mask[:, -t:].to(device=input_ids.device, dtype=torch.bool)
            if bool(mask.all()):
                mask = None

        if doc_ids is not None and (cache is not None or mask is not None):
            raise ValueError("doc_ids (packed training sequences) cannot be combined with a cache or padding")
        # positions: count real tokens only, so a left-padded row gets the positions it would get alone
        offset = cache.positions[:, None] if cache is not None else 0
        if doc_ids is not None:
            idx = torch.arange(t, device=input_ids.device).expand(b, t)
            first = torch.ones_like(doc_ids, dtype=torch.bool)
            first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            positions = idx - torch.where(first, idx, 0).cummax(1).values  # index within the document
        elif mask is None:
            positions = offset + torch.arange(t, device=input_ids.device)[None].expand(b, t)
        else:
            positions = offset + (mask.long().cumsum(1) - 1).clamp(min=0)
        start = cache.extend(mask, t) if cache is not None else 0
        key_valid = cache.valid[:, :start + t] if cache is not None else mask
        attn_mask, causal = None, False
        if doc_ids is not None:
            attn_mask = (doc_ids[:, :, None] == doc_ids[:, None, :]).tril()[:, None]  # [b,1,t,t]
        elif key_valid is not None and not bool(key_valid.all()) or (start > 0 and t > 1):
            q_slot = torch.arange(start, start + t, device=input_ids.device)[:, None]
            k_slot = torch.arange(start + t, device=input_ids.device)[None]
            attn_mask = k_slot <= q_slot  # [t, past+t]
            if key_valid is not None:
                # padded queries attend to themselves only, which keeps their (discarded) rows finite
                attn_mask = (attn_mask & key_valid[:, None, :]) | (k_slot == q_slot)
                attn_mask = attn_mask[:, None]  # [b,1,t,past+t], broadcast over heads
        elif start == 0 and t > 1:
            causal = True

        x = self.embed_tokens(input_ids)  # [b,t,d]; no sqrt(d) scaling
        rope = self.rope(positions)
        ctx = Context(embeddings=x, mask=mask, attn_mask=attn_mask, causal=causal, rope=rope, cache=cache,
                      start=start, doc=doc_ids,
                      chunk_size=min(c.chunk_size, CPU_MAX_CHUNK) if x.device.type == "cpu" else c.chunk_size)
        return self.body(x, ctx, logits_to_keep)

    def body(self, x: Tensor, ctx: Context, logits_to_keep: int = 0) -> Tensor:
        """Embeddings x [b,t,d] -> logits [b,t or logits_to_keep,vocab], through every layer (forward, graphs.py)."""
        for layer in self.layers:
            x = layer(x, ctx, self.shared_blocks)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = self.final_layernorm(x)
        return linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)
