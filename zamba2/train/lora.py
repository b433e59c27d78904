"""LoRA for Zamba2: low-rank adapters on the Mamba in/out projections and the shared blocks, and merging.

Each targeted projection W (a Linear) is replaced in place by a LoRALinear that keeps W's parameters
under the same names, frozen, and adds scale * B A x (scale = alpha / rank; B starts at zero, so
training starts from the base model exactly). Everything else is frozen too.

The shared blocks' projections are called by several hybrid visits. `shared="shared"` puts one adapter
on the shared weight, used by every visit; `shared="per-visit"` gives each visit its own (A, B) pair.
The block's forward is told which visit calls it (its `visit` argument): a forward pre-hook on the block
passes that on, as a slot index, to the block's LoRALinears.

Merging gives a plain checkpoint. A shared adapter folds into its weight: W + scale * B A. A per-visit
adapter cannot fold into a weight all visits share, but on q/k/v and gate_up Zamba2 already has per-visit
low-rank adapters applied to the same input, so B A concatenates into them: the adapter rank becomes
adapter_rank + R for every visit (others padded with zeros; config.adapter_rank is one number). That is
exact and loads in transformers. Per-visit adapters on o_proj / down_proj have nowhere to go: merging
them is an error; save the adapter file instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import UserError, read_json
from ..model.zamba2 import Zamba2LM
from ..ops.layers import Linear, linear

MAMBA_TARGETS = ("in_proj", "out_proj")
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")  # Zamba2's fused gate_up, Zamba1's pair
TARGETS = MAMBA_TARGETS + ATTN_TARGETS + MLP_TARGETS
# shared projection -> the per-visit adapter of the hybrid layer that takes the same input
FOLDABLE = {"q_proj": "q_adapter", "k_proj": "k_adapter", "v_proj": "v_adapter", "gate_up_proj": "mlp_adapter"}


class LoRALinear(Linear):
    """W x (+ bias) + scale * B[slot] A[slot] x, with W and bias taken over from `base` (same names, frozen)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, slots: int, generator: torch.Generator):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # adapters train in float32 even when the frozen base is held in bfloat16
        A = torch.empty(slots, rank, self.in_features)
        for a in A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # nn.Linear's init, as PEFT does
        self.lora_A = nn.Parameter(A.to(self.weight.device))  # [slots, r, in]
        self.lora_B = nn.Parameter(torch.zeros(slots, self.out_features, rank, device=self.weight.device))
        self.scale = alpha / rank
        self.slot = 0

    def delta(self, slot: int) -> Tensor:
        """scale * B A for one slot, float32 [out, in]."""
        return self.scale * self.lora_B[slot].float() @ self.lora_A[slot].float()

    def forward(self, x: Tensor) -> Tensor:
        A, B = self.lora_A[self.slot].to(x.dtype), self.lora_B[self.slot].to(x.dtype)
        return linear(x, self.weight, self.bias) + self.scale * linear(linear(x, A), B)


def _set_slot(block: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a shared block: select the calling visit's adapters (slot = visit // num blocks)."""
    visit = args[1]
    for m in block.modules():
        if isinstance(m, LoRALinear) and m.lora_A.shape[0] > 1:
            m.slot = visit.visit // block.lora_num_blocks


@dataclass
class LoRA:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple = TARGETS
    shared: str = "shared"  # "shared": one adapter per shared weight; "per-visit": one per hybrid visit
    base_dtype: str = "bfloat16"  # the frozen base weights are held in this dtype
    seed: int = 0  # of the A init, so that a run (and its resume) is reproducible

    def __post_init__(self):
        self.targets = tuple(self.targets)
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise UserError(f"unknown LoRA target(s) {unknown or '(none)'}; choose from {list(TARGETS)}")
        if self.rank < 1:
            raise UserError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.shared not in ("shared", "per-visit"):
            raise UserError(f"--lora-shared must be 'shared' or 'per-visit', not {self.shared!r}")
        if self.base_dtype not in ("bfloat16", "float32"):
            raise UserError(f"LoRA base dtype must be bfloat16 or float32, not {self.base_dtype!r}")

    def check_mergeable(self, c) -> None:
        """Raise before training what merge() would raise after it (per-visit adapters with nowhere to fold)."""
        if self.shared != "per-visit":
            return
        for proj in sorted(set(self.targets) - set(MAMBA_TARGETS)):
            flag = c.use_shared_mlp_adapter if proj == "gate_up_proj" else c.use_shared_attention_adapter
            if proj not in FOLDABLE or not flag:
                raise UserError(f"cannot merge a per-visit LoRA on {proj}: Zamba2 has no per-visit adapter there "
                                 "to fold it into; save the adapter file (no --merge), or use --lora-shared shared")

    def apply(self, model: Zamba2LM) -> None:
        """Freeze the model, hold it in base_dtype, and wrap every targeted projection."""
        model.requires_grad_(False)
        model.to(getattr(torch, self.base_dtype))
        gen = torch.Generator().manual_seed(self.seed)
        for layer in model.layers:
            for name in sorted(set(self.targets) & set(MAMBA_TARGETS)):
                setattr(layer.mamba, name, LoRALinear(getattr(layer.mamba, name), self.rank, self.alpha, 1, gen))
        c = model.config
        n_visits = len(c.hybrid_layer_ids)
        for b, block in enumerate(model.shared_blocks):
            slots = len(range(b, n_visits, c.num_mem_blocks)) if self.shared == "per-visit" else 1
            for parent, names in ((block.self_attn, ATTN_TARGETS), (block.feed_forward, MLP_TARGETS)):
                for name in sorted(n for n in set(self.targets) & set(names) if hasattr(parent, n)):
                    setattr(parent, name, LoRALinear(getattr(parent, name), self.rank, self.alpha, slots, gen))
            if slots > 1:
                block.lora_num_blocks = c.num_mem_blocks
                block.register_forward_pre_hook(_set_slot)

    @staticmethod
    def split_state_dict(state: dict) -> tuple[dict, dict]:
        """(base weights, adapter weights) of a wrapped model's state dict."""
        is_lora = lambda k: k.endswith((".lora_A", ".lora_B"))
        return {k: v for k, v in state.items() if not is_lora(k)}, {k: v for k, v in state.items() if is_lora(k)}

    @staticmethod
    def load_state_dict(model: Zamba2LM, adapters: dict) -> None:
        params = dict(model.named_parameters())
        missing = sorted(k for k in params if k.endswith((".lora_A", ".lora_B")) and k not in adapters)
        unexpected = sorted(set(adapters) - set(params))
        if missing or unexpected:
            raise UserError(f"adapter weights do not match the LoRA setup: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        with torch.no_grad():
            for k, v in adapters.items():
                if params[k].shape != v.shape:
                    raise UserError(f"adapter {k}: shape {tuple(v.shape)}, expected {tuple(params[k].shape)}")
                params[k].copy_(v)

    def save(self, model: Zamba2LM, folder: str | Path) -> None:
        """adapter.safetensors + adapter_config.json (this LoRA's settings) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _, adapters = self.split_state_dict(model.state_dict())
        save_file({k: v.detach().float().contiguous().cpu() for k, v in adapters.items()},
                  str(folder / "adapter.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(dataclasses.asdict(self), indent=2))


def load_adapter(model: Zamba2LM, folder: str | Path) -> LoRA:
    """Wrap `model` as the adapter folder's LoRA describes and load its weights; returns that LoRA."""
    folder = Path(folder)
    try:
        settings = read_json(folder / "adapter_config.json")
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no adapter_config.json") from None
    lora = LoRA(**settings)
    lora.apply(model)
    lora.load_state_dict(model, load_file(str(folder / "adapter.safetensors")))
    return lora


@torch.no_grad()
def merge(model: Zamba2LM) -> Zamba2LM:
    """A plain float32 model (Zamba2LM or Zamba1LM) equal to the wrapped `model` (see the module docstring for per-visit adapters)."""
    c = model.config
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    state, _ = LoRA.split_state_dict({k: v.float() for k, v in model.state_dict().items()})
    folds = {}  # per-visit shared projection name -> {block: its LoRALinear}
    for name, m in wrapped.items():
        if m.lora_A.shape[0] == 1:  # one adapter for every call (a block visited once is per-visit and shared)
            state[name + ".weight"] = state[name + ".weight"] + m.delta(0)
            continue
        proj = name.rsplit(".", 1)[1]
        adapter = FOLDABLE.get(proj)
        flag = c.use_shared_mlp_adapter if proj == "gate_up_proj" else c.use_shared_attention_adapter
        if adapter is None or not flag:
            raise UserError(f"cannot merge a per-visit LoRA on {proj}: Zamba2 has no per-visit adapter there "
                             "to fold it into; save the adapter file (no --merge), or use --lora-shared shared")
        folds.setdefault(proj, {})[int(name.split(".")[1])] = m
    if folds:
        rank = next(iter(wrapped.values())).lora_A.shape[1]  # R, the same for every wrapped projection
        for j, i in enumerate(c.hybrid_layer_ids):
            b = j % c.num_mem_blocks
            for proj, adapter in FOLDABLE.items():
                key = f"layers.{i}.{adapter}"
                if key + ".0.weight" not in state:
                    continue
                A0, B0 = state[key + ".0.weight"], state[key + ".1.weight"]  # [r0, in], [out, r0]
                m = folds.get(proj, {}).get(b)  # None: not adapted per visit (a one-visit block merged above)
                if m is not None:
                    A, B = m.lora_A[j // c.num_mem_blocks].float(), m.scale * m.lora_B[j // c.num_mem_blocks].float()
                else:  # zeros keep every visit's adapters at the one rank the config allows
                    A, B = A0.new_zeros(rank, A0.shape[1]), B0.new_zeros(B0.shape[0], rank)
                state[key + ".0.weight"] = torch.cat([A0, A])  # [r0+R, in]
                state[key + ".1.weight"] = torch.cat([B0, B], dim=1)  # [out, r0+R]
        c = dataclasses.replace(c, adapter_rank=c.adapter_rank + rank)
    with torch.device("meta"):
        merged = type(model)(c)
    merged.load_state_dict(state, strict=True, assign=True)
    return merged.eval()
