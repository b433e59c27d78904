"""A model's decode step as one compiled call (kernels.py's Decoder): embedding, every layer, final norm, LM head.

Run layer by layer, decode paid ~0.1 ms of Python per layer around its compiled calls, 10-15% of a token on
`small`. A Decoder holds the tensors the model holds, so in-place changes to them (optimizer steps,
load_state_dict, `.to(dtype)`, which swaps `.data`) need nothing; a replaced module or parameter (quantize_int8,
LoRA, assignment) is found by comparing the model's module tree with the one the Decoder was built from, which
costs a few microseconds a step.

The model's torch code (Zamba2LM.forward with the kernels off) is the reference the tests compare against.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from . import kernels

FUSABLE: set[type] = set()  # projection types whose weights the compiled code reads itself (model.py, quant.py)


def plain(*projections: nn.Module) -> bool:
    """Whether the compiled decode can read these projections' weights itself (no bias, not LoRA)."""
    return all(type(m) in FUSABLE and m.bias is None for m in projections)


def weight(m: nn.Module) -> tuple:
    """(weight, scale per row or None) of a plain projection, as the compiled code takes it."""
    return m.weight, m.scale


class ModuleTree:
    """A snapshot of a model's module tree, to tell whether a module, parameter or buffer was replaced since."""

    def __init__(self, model: nn.Module):
        self.dicts, self.keys, self.values = [], [], []
        for m in model.modules():
            for d in (m._modules, m._parameters, m._buffers):
                for key, v in d.items():
                    self.dicts.append(d)
                    self.keys.append(key)
                    self.values.append(v)  # held, so that the ids below stay theirs
        self.ids = list(map(id, self.values))
        self.tensors = [v for v in self.values if isinstance(v, torch.Tensor)]

    def current(self) -> bool:
        return list(map(id, map(dict.get, self.dicts, self.keys))) == self.ids


class _Built(ModuleTree):
    """A model's Decoder (None when a projection is not plain) and the module tree it was built from."""

    def __init__(self, model: nn.Module, k):
        super().__init__(model)
        self.decoder = _decoder(model, k)


_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(model: nn.Module):
    """The model's Decoder for this step, or None: kernels unavailable, a projection that is not plain, or
    autograd tracking a weight."""
    k = kernels.get(model.embed_tokens.weight)
    if k is None:
        return None
    built = _BUILT.get(model)
    if built is None or not built.current():
        built = _BUILT[model] = _Built(model, k)
    if built.decoder is None or torch.is_grad_enabled() and any(t.requires_grad for t in built.tensors):
        return None
    return built.decoder


def _decoder(model: nn.Module, k):
    layers, visits = [], []
    for layer in model.layers:
        mx, norm = layer.mamba, layer.input_layernorm
        # TODO(zamba1): a compiled Mamba1 step (the per-channel selective-scan update); until then Zamba1 decodes
        # through its forward (the mixer has no step_params)
        if not hasattr(mx, "step_params") or not plain(mx.in_proj, mx.out_proj):
            return None
        layers.append((norm.weight, norm.eps, weight(mx.in_proj), weight(mx.out_proj), *mx.step_params()))
        visit = None
        if layer.visit is not None:
            visit = _visit(layer, model.shared_blocks[layer.block])
            if visit is None:
                return None
        visits.append(visit)
    if model.lm_head is not None and not plain(model.lm_head):
        return None
    head = (model.embed_tokens.weight, None) if model.lm_head is None else weight(model.lm_head)
    final = model.final_layernorm
    return k.Decoder(model.embed_tokens.weight, layers, visits, final.weight, final.eps, head)


def _visit(layer: nn.Module, block: nn.Module) -> tuple | None:
    """shared_block's per-model arguments for a hybrid layer's visit, or None when a projection is not plain."""
    att, mlp = block.self_attn, block.feed_forward
    projections = (att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.gate_up_proj, mlp.down_proj, layer.linear)
    pairs = (layer.q_adapter, layer.k_adapter, layer.v_adapter, layer.mlp_adapter)
    if not plain(*projections, *(m for a in pairs if a is not None for m in a)):
        return None
    adapters = [w for a in pairs for w in ((weight(a[0]), weight(a[1])) if a is not None else (None, None))]
    return ([block.input_layernorm.weight, block.pre_ff_layernorm.weight], block.input_layernorm.eps,
            [weight(m) for m in projections], adapters if any(a is not None for a in pairs) else [],
            att.heads, att.scale, mlp.act_code)
