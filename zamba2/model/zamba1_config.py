"""Zamba1 configuration: one dataclass whose fields are the keys of a transformers `ZambaConfig` config.json
(model_type "zamba"), as published for Zyphra/Zamba-7B-v1 and written by `save_pretrained`.

The defaults are Zamba-7B-v1's (transformers' ZambaConfig defaults). Keys that carry no information for us are
in IGNORED_KEYS; anything else is rejected naming it. Derived sizes are properties, never written back.

The shared code (model/zamba2.py's shared attention and layers, model/cache.py) reads a few Zamba2 names; the class
attributes below answer them for Zamba1: one shared block, no per-visit adapters, no RoPE.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import UserError, check_choice, check_keys, check_range, check_types, naming, read_json
from .config import HYBRID_TYPES, MAMBA_TYPES, SharedBlockSizes

DERIVED_KEYS = {"attention_hidden_size", "attention_head_dim", "head_dim"}
IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "use_mamba_kernels", "use_associative_scan", "use_cache", "num_logits_to_keep", "attention_dropout",
    "initializer_range", "output_attentions", "output_hidden_states", "return_dict", "tokenizer_class",
    "quantization_config", "sliding_window",
}
POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "n_mamba_heads", "attn_layer_period", "mamba_d_state", "mamba_d_conv",
            "mamba_expand", "max_position_embeddings", "time_step_min", "time_step_max", "time_step_floor",
            "rms_norm_eps", "chunk_size")


@dataclass
class Zamba1Config(SharedBlockSizes):
    vocab_size: int = 32000
    hidden_size: int = 3712  # D
    num_hidden_layers: int = 76  # L; every layer owns a Mamba1 mixer
    layers_block_type: list = field(default_factory=list)  # "mamba" | "hybrid" per layer; empty -> from the period
    intermediate_size: int = 14848  # F, shared-MLP width
    hidden_act: str = "gelu"  # the shared MLP's gate
    hidden_mamba_act: str = "silu"  # after the mixer's conv (SiLU in every Mamba)
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    n_mamba_heads: int = 2  # H: d_inner splits into H independent Mamba1 heads, each with its own x_proj, dt_proj
    attn_layer_period: int = 6  # with the offset, where the shared block runs (see hybrid_pattern)
    attn_layer_offset: int = 4
    mamba_d_state: int = 16  # N
    mamba_d_conv: int = 4
    mamba_expand: int = 2  # d_inner = expand * D
    mamba_dt_rank: int | str = "auto"  # R, rank of dt's projection; "auto" -> ceil(D / 16)
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False  # biases on in_proj / out_proj
    time_step_min: float = 0.001  # init range of dt (training from scratch); no clamp in the forward
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    # our selective scan's chunk length: speed only, not written to config.json. A 512-token scan at the 7B shape
    # took 0.26 / 0.21 / 0.27 / 0.45 s at chunks 8 / 16 / 32 / 64 on the 2-core machine; at hidden 512 the chunk
    # hardly mattered (0.06-0.08 s) and the sequential loop took 4 s
    chunk_size: int = 16

    model_type = "zamba"
    num_mem_blocks = 1  # one shared attention + MLP block, reused by every hybrid layer
    use_shared_attention_adapter = use_shared_mlp_adapter = False  # no per-visit adapters in Zamba1
    use_mem_rope = False  # the shared attention has no positional encoding

    def __post_init__(self):
        check_types(self, "config")
        if self.mamba_dt_rank == "auto":
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        if not isinstance(self.mamba_dt_rank, int):
            raise UserError(f"config: mamba_dt_rank = {self.mamba_dt_rank!r}; expected an integer or 'auto'")
        for name in POSITIVE + ("mamba_dt_rank",):
            check_range("config", name, getattr(self, name), 0, low_open=True)
        check_range("config", "attn_layer_offset", self.attn_layer_offset, 0)
        check_choice("config", "hidden_act", self.hidden_act, ("gelu", "gelu_pytorch_tanh", "silu"))
        check_choice("config", "hidden_mamba_act", self.hidden_mamba_act, ("silu",))
        types = self.layers_block_type or hybrid_pattern(self.num_hidden_layers, self.attn_layer_period,
                                                         self.attn_layer_offset)
        if any(t not in MAMBA_TYPES | HYBRID_TYPES for t in types):
            raise UserError(f"config: unknown layer type in layers_block_type {sorted(set(types))}")
        self.layers_block_type = ["hybrid" if t in HYBRID_TYPES else "mamba" for t in types]
        if len(types) != self.num_hidden_layers:
            raise UserError(f"config: layers_block_type has {len(types)} entries but num_hidden_layers is "
                            f"{self.num_hidden_layers}")
        for name in ("pad_token_id", "bos_token_id"):
            if getattr(self, name) is not None:
                check_range("config", name, getattr(self, name), 0, self.vocab_size, high_open=True)
        if self.d_inner % self.n_mamba_heads:
            raise UserError("config: mamba_expand*hidden_size must divide by n_mamba_heads")
        if (2 * self.hidden_size) % self.num_attention_heads:
            raise UserError("config: 2*hidden_size must divide by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError("config: num_attention_heads must divide by num_key_value_heads")

    # ---- derived sizes (never written to config.json) ----
    @property
    def hybrid_layer_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.layers_block_type) if t == "hybrid"]

    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_headdim(self) -> int:  # P, channels per Mamba head
        return self.d_inner // self.n_mamba_heads

    @property
    def conv_dim(self) -> int:  # the conv runs on x only (B, C come after it, from x_proj)
        return self.d_inner

    # ---- (de)serialisation ----
    @classmethod
    def from_dict(cls, d: dict) -> "Zamba1Config":
        known = {f.name for f in fields(cls)}
        check_keys("config", [k for k in d if k not in DERIVED_KEYS | IGNORED_KEYS], known, "key")
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        expect = {"attention_hidden_size": cfg.attention_hidden_size, "attention_head_dim": cfg.attention_head_dim,
                  "head_dim": cfg.attention_head_dim}
        cls.check_derived(d, expect)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "Zamba1Config":
        path = Path(path)
        d = read_json(path, f"no config.json at {path}")
        if not isinstance(d, dict) or d.get("model_type") != "zamba":
            raise UserError(f"{path}: expected a JSON object with model_type 'zamba'")
        with naming(path):
            return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["chunk_size"]  # ours, not transformers'
        d.update(model_type="zamba", architectures=["ZambaForCausalLM"])
        return d


def hybrid_pattern(n_layers: int, period: int, offset: int) -> list[str]:
    """transformers' ZambaConfig layout when config.json lists no layer types: layer 2 is hybrid, then layer 3 + i
    is hybrid when i % period == offset (Zamba-7B-v1: 2, 7, 13, 19, ..., 73)."""
    rest = ["hybrid" if i % period == offset else "mamba" for i in range(n_layers - 3)]
    return (["mamba", "mamba", "hybrid"] + rest)[:n_layers]


def tiny(**overrides) -> Zamba1Config:
    """A few-thousand-parameter Zamba1 for tests: two Mamba heads, chunk smaller than typical prompts."""
    base = dict(vocab_size=128, hidden_size=32, num_hidden_layers=5, layers_block_type=hybrid_pattern(5, 2, 0),
                intermediate_size=64, num_attention_heads=4, num_key_value_heads=4, n_mamba_heads=2,
                mamba_d_state=8, chunk_size=8, max_position_embeddings=512)
    base.update(overrides)
    return Zamba1Config(**base)


def small(**overrides) -> Zamba1Config:
    """About 50M parameters (hidden 512, 12 layers, 2 hybrid): the benchmark and demo-scale preset."""
    base = dict(hidden_size=512, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=8,
                num_key_value_heads=8, n_mamba_heads=2, max_position_embeddings=32768,
                layers_block_type=hybrid_pattern(12, 6, 4))
    base.update(overrides)
    return Zamba1Config(**base)


def zamba_7b(**overrides) -> Zamba1Config:
    """Zyphra/Zamba-7B-v1's sizes (transformers' ZambaConfig defaults): hidden 3712, 76 layers, 13 hybrid."""
    return Zamba1Config(**overrides)


PRESETS = {"tiny": tiny, "small": small, "7b-shape": zamba_7b}


def preset(name: str, **overrides) -> Zamba1Config:
    if name not in PRESETS:
        raise UserError(f"unknown Zamba1 preset {name!r}; choose from {sorted(PRESETS)}")
    check_keys(f"preset {name!r}", overrides, [f.name for f in fields(Zamba1Config)], "Zamba1Config field")
    return PRESETS[name](**overrides)
