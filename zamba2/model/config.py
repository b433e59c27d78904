"""Zamba2 configuration: one dataclass whose fields are the keys of a Hugging Face config.json.

`Config.from_dict` accepts the config.json files published for Zyphra/Zamba2-{1.2B,2.7B,7B}(-instruct),
those written by `transformers` (`save_pretrained`), and the legacy Zyphra key names (see LEGACY_KEYS).
Keys that carry no information for us are listed in IGNORED_KEYS; anything else is rejected with a
message naming it, so a typo never silently changes the model. Derived sizes are properties and are
never written back (transformers re-derives them on load).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from ..errors import UserError, check_keys, check_range, check_types, naming, read_json

# old Zyphra / transformers key -> our (current config.json) key
LEGACY_KEYS = {
    "layer_types": "layers_block_type",
    "ffn_hidden_size": "intermediate_size",
    "use_shared_attention_lora": "use_shared_attention_adapter",
    "use_shared_block_lora": "use_shared_mlp_adapter",
    "lora_rank": "adapter_rank",
    "state_size": "mamba_d_state",
    "conv_dimension": "mamba_d_conv",
    "expansion_factor": "mamba_expand",
}

# Keys that are derived from the fields (checked for consistency) ...
DERIVED_KEYS = {
    "hybrid_layer_ids", "mamba_headdim", "attention_hidden_size", "attention_head_dim", "head_dim",
    "kv_channels", "num_query_groups",
}
# ... and keys that do not change the forward pass (bookkeeping, training-only or kernel switches).
IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "use_mamba_kernels", "use_mem_eff_path", "use_cache", "num_logits_to_keep", "attention_dropout",
    "initializer_range", "output_attentions", "output_hidden_states", "return_dict", "auto_map",
    "time_step_limit", "ft_lora", "residual_in_fp32", "layer_norm_epsilon", "sliding_window",
    "tokenizer_class", "quantization_config",
}

# sizes and rates that must be > 0 (a zero or negative one fails deep inside the model, or divides by zero)
POSITIVE = (
    "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "num_mem_blocks", "adapter_rank", "max_position_embeddings", "mamba_d_state",
    "mamba_d_conv", "mamba_expand", "mamba_ngroups", "n_mamba_heads", "chunk_size", "rope_theta", "time_step_min",
    "time_step_max", "time_step_floor", "rms_norm_eps",
)

MAMBA_TYPES = {"mamba", "m", "linear_attention"}  # names used by Zyphra, old and new transformers
HYBRID_TYPES = {"hybrid", "g"}


class SharedBlockSizes:
    """What both architectures' configs (this Config and zamba1_config.Zamba1Config) derive and check alike."""

    @property
    def attention_hidden_size(self) -> int:  # the shared block reads concat(hidden, embeddings)
        return 2 * self.hidden_size

    @property
    def attention_head_dim(self) -> int:  # 2D / nh, not D / nh
        return self.attention_hidden_size // self.num_attention_heads

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    @staticmethod
    def check_derived(given: dict, expect: dict) -> None:
        """config.json's derived keys (`given`) must equal what the other fields imply (`expect`)."""
        for k, v in given.items():
            if k in expect and v is not None and v != expect[k]:
                raise UserError(f"config: {k}={v} contradicts the other fields (they imply {expect[k]})")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


@dataclass
class Config(SharedBlockSizes):
    vocab_size: int = 32000  # Mistral v0.1 SentencePiece vocabulary
    hidden_size: int = 2560  # D, width of the residual stream
    num_hidden_layers: int = 54  # L; every layer owns a Mamba2 mixer
    layers_block_type: list = field(default_factory=list)  # "mamba" | "hybrid" per layer
    intermediate_size: int | None = None  # F, shared-MLP width (None -> 4 D)
    hidden_act: str = "gelu"  # exact erf GELU, used as a GLU gate
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> MHA
    num_mem_blocks: int = 1  # distinct shared transformer blocks, used round-robin over hybrid layers
    use_shared_attention_adapter: bool = False  # rank-r q/k/v adapters per hybrid visit
    use_shared_mlp_adapter: bool = True  # rank-r gate_up adapter per hybrid visit (always in released models)
    adapter_rank: int = 128
    use_mem_rope: bool = False  # RoPE inside the shared attention (1.2B and 7B)
    rope_theta: float = 10000.0
    use_long_context: bool = False  # NTK-style theta scaling, max positions 16384
    max_position_embeddings: int = 4096
    mamba_d_state: int = 64  # N
    mamba_d_conv: int = 4  # depthwise causal conv width
    mamba_expand: int = 2  # d_inner = expand * D
    mamba_ngroups: int = 1  # G, groups of B/C shared by H/G heads
    n_mamba_heads: int = 8  # H; released models use d_inner / 64
    use_conv_bias: bool = True
    add_bias_linear: bool = False  # biases on in_proj/out_proj and the shared MLP
    chunk_size: int = 256  # SSD chunk length: a numerics/speed knob, not a model property
    time_step_min: float = 0.001  # dt is clamped below at this value, as transformers does
    time_step_max: float = 0.1  # init range of dt (training from scratch)
    time_step_floor: float = 1e-4
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2

    model_type = "zamba2"  # config.json's, which picks the architecture (checkpoint.ARCHITECTURES)

    def __post_init__(self):
        check_types(self, "config")
        if not self.layers_block_type:
            raise UserError("config: layers_block_type is required (one 'mamba'/'hybrid' entry per layer)")
        types = []
        for t in self.layers_block_type:
            if t in MAMBA_TYPES:
                types.append("mamba")
            elif t in HYBRID_TYPES:
                types.append("hybrid")
            else:
                raise UserError(f"config: unknown layer type {t!r} in layers_block_type")
        self.layers_block_type = types
        if len(types) != self.num_hidden_layers:
            raise UserError(
                f"config: layers_block_type has {len(types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in POSITIVE:
            check_range("config", name, getattr(self, name), 0, low_open=True)
        for name in ("pad_token_id", "bos_token_id"):
            if getattr(self, name) is not None:
                check_range("config", name, getattr(self, name), 0, self.vocab_size, high_open=True)
        for i in self.eos_token_ids:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.vocab_size:
                raise UserError(f"config: eos_token_id = {self.eos_token_id!r}; expected token ids in "
                                f"[0, {self.vocab_size}) (an integer or a list of them)")
        checks = [
            (self.hidden_act in ("gelu", "gelu_pytorch_tanh", "silu"), f"hidden_act {self.hidden_act!r} unsupported"),
            (self.d_inner % self.n_mamba_heads == 0, "mamba_expand*hidden_size must divide by n_mamba_heads"),
            (self.n_mamba_heads % self.mamba_ngroups == 0, "n_mamba_heads must divide by mamba_ngroups"),
            ((2 * self.hidden_size) % self.num_attention_heads == 0, "2*hidden_size must divide by num_attention_heads"),
            (self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads must divide by num_key_value_heads"),
            (not self.use_mem_rope or self.attention_head_dim % 2 == 0, "RoPE needs an even attention head dim"),
            (not self.hybrid_layer_ids or len(self.hybrid_layer_ids) >= self.num_mem_blocks,
             "fewer hybrid layers than num_mem_blocks"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"config: {msg}")

    # ---- derived sizes (never written to config.json) ----
    @property
    def hybrid_layer_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.layers_block_type) if t == "hybrid"]

    @property
    def d_inner(self) -> int:
        return int(self.mamba_expand * self.hidden_size)

    @property
    def mamba_headdim(self) -> int:  # P
        return self.d_inner // self.n_mamba_heads

    @property
    def conv_dim(self) -> int:  # channels that go through the causal conv: x, B, C
        return self.d_inner + 2 * self.mamba_ngroups * self.mamba_d_state

    @property
    def in_proj_size(self) -> int:  # rows of in_proj: [z, x, B, C, dt]
        return self.d_inner + self.conv_dim + self.n_mamba_heads

    @property
    def effective_rope_theta(self) -> float:
        if not self.use_long_context:
            return self.rope_theta
        hd = self.attention_head_dim
        return self.rope_theta * 8 ** (hd / (hd - 2))  # NTK-aware scaling used by Zyphra's long-context mode

    # ---- (de)serialisation ----
    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = dict(d)
        known = {f.name for f in fields(cls)}
        kw, derived = {}, {}
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None)
        if rope:
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raise UserError(f"config: rope type {rope.get('rope_type', rope.get('type'))!r} is not used by Zamba2")
            if "rope_theta" in rope:
                kw["rope_theta"] = rope["rope_theta"]
        for k, v in d.items():
            k = LEGACY_KEYS.get(k, k)
            if k in known:
                kw[k] = v
            elif k in DERIVED_KEYS:
                derived[k] = v
            elif k not in IGNORED_KEYS:
                check_keys("config", [k], known, "key")
        cfg = cls(**kw)
        expect = {
            "hybrid_layer_ids": cfg.hybrid_layer_ids, "mamba_headdim": cfg.mamba_headdim,
            "attention_hidden_size": cfg.attention_hidden_size, "attention_head_dim": cfg.attention_head_dim,
            "head_dim": cfg.attention_head_dim, "kv_channels": cfg.hidden_size // cfg.num_attention_heads,
        }
        cls.check_derived(derived, expect)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "Config":
        path = Path(path)
        d = read_json(path, f"no config.json at {path}")
        if not isinstance(d, dict):
            raise UserError(f"{path}: expected a JSON object")
        if d.get("model_type", "zamba2") != "zamba2":
            raise UserError(f"{path}: model_type is {d['model_type']!r}, expected 'zamba2'")
        with naming(path):
            return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(model_type="zamba2", architectures=["Zamba2ForCausalLM"])
        return d

    def num_parameters(self) -> int:
        """Stored parameter count implied by the config (shared blocks counted once)."""
        D, F, r, V = self.hidden_size, self.intermediate_size, self.adapter_rank, self.vocab_size
        A, hd = self.attention_hidden_size, self.attention_head_dim
        nq, nkv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        b = int(self.add_bias_linear)
        mamba = (D * self.in_proj_size + b * self.in_proj_size + self.conv_dim * (self.mamba_d_conv + int(self.use_conv_bias))
                 + 3 * self.n_mamba_heads + self.d_inner + self.d_inner * D + b * D + D)
        block = A + A * (nq + 2 * nkv) + nq * D + D + D * 2 * F + b * 2 * F + F * D + b * D
        visit = D * D
        if self.use_shared_attention_adapter:
            visit += r * A * 3 + r * (nq + 2 * nkv)
        if self.use_shared_mlp_adapter:
            visit += r * D + r * 2 * F
        head = 0 if self.tie_word_embeddings else V * D
        return (V * D + D + head + self.num_hidden_layers * mamba + self.num_mem_blocks * block
                + len(self.hybrid_layer_ids) * visit)


def _pattern(n_layers: int, hybrid: list[int]) -> list[str]:
    return ["hybrid" if i in hybrid else "mamba" for i in range(n_layers)]


def tiny(**overrides) -> Config:
    """A few-thousand-parameter model for tests: every feature on, chunk smaller than typical prompts."""
    base = dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=5, layers_block_type=_pattern(5, [1, 3, 4]),
        intermediate_size=64, num_attention_heads=4, num_mem_blocks=2, use_shared_attention_adapter=True,
        adapter_rank=4, use_mem_rope=True, mamba_d_state=8, n_mamba_heads=4, mamba_ngroups=2, chunk_size=8,
        max_position_embeddings=512,
    )
    base.update(overrides)
    return Config(**base)


def small(**overrides) -> Config:
    """About 45M parameters (hidden 512, 12 layers, 2 hybrid): the benchmark and demo-scale preset."""
    base = dict(
        vocab_size=32000, hidden_size=512, num_hidden_layers=12, layers_block_type=_pattern(12, [5, 11]),
        num_attention_heads=8, num_mem_blocks=1, use_shared_attention_adapter=True, adapter_rank=32,
        use_mem_rope=True, mamba_d_state=64, n_mamba_heads=16, max_position_embeddings=32768,
    )
    base.update(overrides)
    return Config(**base)


def zamba2_1_2b(**overrides) -> Config:
    base = dict(
        hidden_size=2048, num_hidden_layers=38, layers_block_type=_pattern(38, [5, 11, 17, 23, 29, 35]),
        intermediate_size=8192, num_mem_blocks=1, use_shared_attention_adapter=True, use_mem_rope=True,
        mamba_d_state=128, n_mamba_heads=64,
    )
    base.update(overrides)
    return Config(**base)


def zamba2_2_7b(**overrides) -> Config:
    base = dict(
        hidden_size=2560, num_hidden_layers=54, layers_block_type=_pattern(54, [6, 12, 18, 24, 30, 36, 42, 47, 51]),
        intermediate_size=10240, num_mem_blocks=2, mamba_d_state=64, n_mamba_heads=80,
    )
    base.update(overrides)
    return Config(**base)


def zamba2_7b(**overrides) -> Config:
    """Zyphra/Zamba2-7B's sizes: 81 layers (68 Mamba2 + 13 hybrid, about every sixth), two shared blocks, 112 SSM
    heads in 2 groups, attention head dim 224. The hybrid positions here are every sixth layer from 6; they move
    no size, so memory and speed figures hold, but load the Hub's config.json for its exact pattern."""
    base = dict(
        hidden_size=3584, num_hidden_layers=81, layers_block_type=_pattern(81, list(range(6, 81, 6))),
        intermediate_size=14336, num_mem_blocks=2, use_mem_rope=True, mamba_d_state=64, mamba_ngroups=2,
        n_mamba_heads=112,
    )
    base.update(overrides)
    return Config(**base)


PRESETS = {"tiny": tiny, "small": small, "1.2b": zamba2_1_2b, "2.7b": zamba2_2_7b, "7b": zamba2_7b}


def preset(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    check_keys(f"preset {name!r}", overrides, [f.name for f in fields(Config)], "Config field")
    return PRESETS[name](**overrides)

