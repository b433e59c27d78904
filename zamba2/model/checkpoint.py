"""Hugging Face checkpoint folders <-> Zamba2LM or Zamba1LM, the architecture picked by config.json's model_type
("zamba2" or "zamba", ARCHITECTURES).

A folder holds config.json and the weights: model.safetensors, or shards listed in
model.safetensors.index.json (pytorch_model*.bin is read too, for re-saved fine-tunes). Tensors are
read only from the files the index names, never by globbing.

The key map is a literal table per architecture (HF_KEYS for Zamba2, ZAMBA1_KEYS), read left to right to load (hf_to_native) and right to
left to save (native_to_hf). Placeholders: {i} layer, {j} hybrid visit (0-based position
among the hybrid layers), {b} shared block, {w} the rest of the name. On the right, {J} is the layer
of visit j and {B} the shared block used at layer i. The first matching row wins.

Published checkpoints store each shared block once, under its first hybrid layer (the "source"
layer); fine-tuned re-saves often duplicate it under every hybrid layer: copies are accepted and must
be equal. Some Hub repos (the 7B) also carry a legacy layout (model.blocks / mamba_layers /
linear_layers); it is used only when no model.layers.* key exists.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError, device as check_device, naming, read_json
from ..hub import resolve
from ..ops.layers import Linear, Quantization
from .config import Config
from .zamba1 import Zamba1LM
from .zamba1_config import Zamba1Config
from .zamba2 import Zamba2LM

# config.json's model_type -> its config and model classes
ARCHITECTURES = {"zamba2": (Config, Zamba2LM), "zamba": (Zamba1Config, Zamba1LM)}

# the rows both architectures' tables start with
LAYER_KEYS = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.final_layernorm.weight": "final_layernorm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.input_layernorm.weight",
    "model.layers.{i}.mamba.{w}": "layers.{i}.mamba.{w}",
    "model.layers.{i}.mamba_decoder.input_layernorm.weight": "layers.{i}.input_layernorm.weight",
    "model.layers.{i}.mamba_decoder.mamba.{w}": "layers.{i}.mamba.{w}",
    "model.layers.{i}.linear.weight": "layers.{i}.linear.weight",
}
HF_KEYS = {
    **LAYER_KEYS,
    "model.layers.{i}.shared_transformer.self_attn.linear_{qkv}_adapter_list.{j}.{ab}.weight":
        "layers.{J}.{qkv}_adapter.{ab}.weight",
    "model.layers.{i}.shared_transformer.feed_forward.gate_up_proj_adapter_list.{j}.{ab}.weight":
        "layers.{J}.mlp_adapter.{ab}.weight",
    "model.layers.{i}.shared_transformer.{w}": "shared_blocks.{B}.{w}",
    # legacy layout
    "model.blocks.{b}.feed_forward.linear_fc1.weight": "shared_blocks.{b}.feed_forward.gate_up_proj.weight",
    "model.blocks.{b}.feed_forward.linear_fc2.weight": "shared_blocks.{b}.feed_forward.down_proj.weight",
    "model.blocks.{b}.feed_forward.linear_fc1_lora_A_list.{j}.weight": "layers.{J}.mlp_adapter.0.weight",
    "model.blocks.{b}.feed_forward.linear_fc1_lora_B_list.{j}.weight": "layers.{J}.mlp_adapter.1.weight",
    "model.blocks.{b}.self_attn.linear_{qkv}_adapter_list.{j}.{ab}.weight": "layers.{J}.{qkv}_adapter.{ab}.weight",
    "model.blocks.{b}.{w}": "shared_blocks.{b}.{w}",
    "model.mamba_layers.{i}.{w}": "layers.{i}.{w}",
    "model.linear_layers.{j}.weight": "layers.{J}.linear.weight",
}
LEGACY_PREFIXES = ("model.blocks.", "model.mamba_layers.", "model.linear_layers.")
# Zamba1 (transformers' ZambaForCausalLM): the one shared block is `shared_transf`, tied across the hybrid layers;
# save_pretrained writes it under the first hybrid layer, a re-save may copy it under every one.
ZAMBA1_KEYS = {
    **LAYER_KEYS,
    "model.layers.{i}.shared_transf.{w}": "shared_blocks.{B}.{w}",
}
_SLOTS = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "b": r"(?P<b>\d+)", "qkv": r"(?P<qkv>[qkv])",
          "ab": r"(?P<ab>[01])", "w": r"(?P<w>.+)", "J": r"(?P<J>\d+)", "B": r"(?P<B>\d+)"}


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{", "{").replace(r"\}", "}").format(**_SLOTS) + "$")


class KeyTable:
    """A key table compiled: its rows left to right for loading, the non-legacy rows right to left for saving (a
    Mamba weight has two rows: plain layer, hybrid layer's mamba_decoder)."""

    def __init__(self, rows: dict[str, str], legacy: tuple[str, ...] = ()):
        self.patterns = [(_pattern(src), dst) for src, dst in rows.items()]
        decoder = {dst for src, dst in rows.items() if ".mamba_decoder." in src}
        self.inverse = [(src, _pattern(dst), dst in decoder) for src, dst in rows.items() if not src.startswith(legacy)]


TABLES = {"zamba2": KeyTable(HF_KEYS, LEGACY_PREFIXES), "zamba": KeyTable(ZAMBA1_KEYS)}


class CheckpointError(UserError):
    """A checkpoint folder that cannot be loaded as the model its config describes."""


def hf_to_native(key: str, cfg: Config | Zamba1Config) -> str | None:
    """Our parameter name for a checkpoint key (None if no row of the architecture's table matches)."""
    hybrid = cfg.hybrid_layer_ids
    for pattern, dst in TABLES[cfg.model_type].patterns:
        m = pattern.match(key)
        if not m:
            continue
        g = m.groupdict()
        if "j" in g:
            j = int(g["j"])
            if j >= len(hybrid):
                raise CheckpointError(f"{key}: hybrid visit {j} does not exist (config has {len(hybrid)} hybrid layers)")
            g["J"] = hybrid[j]
        if "{B}" in dst:
            i = int(g["i"])
            if i not in hybrid:
                raise CheckpointError(f"{key}: shared-block weights under layer {i}, which the config says is not hybrid")
            g["B"] = hybrid.index(i) % cfg.num_mem_blocks
        return dst.format(**g)
    return None


def native_to_hf(key: str, cfg: Config | Zamba1Config) -> str:
    """Checkpoint key for our parameter name: the inverse of hf_to_native through the same table (the first
    non-legacy row whose right side matches). Shared weights are written once, under their source layer (the
    first hybrid layer using the block); a hybrid layer's own Mamba weights go under mamba_decoder, as
    transformers writes them, a Mamba layer's straight under the layer."""
    hybrid = cfg.hybrid_layer_ids
    for src, pattern, by_layer_kind in TABLES[cfg.model_type].inverse:
        m = pattern.match(key)
        if not m:
            continue
        g = m.groupdict()
        if "J" in g:  # visit j of a hybrid layer: its adapters live under the source layer of its block
            if int(g["J"]) not in hybrid:
                continue
            g["j"] = hybrid.index(int(g["J"]))
            g["i"] = hybrid[g["j"] % cfg.num_mem_blocks]
        elif "B" in g:
            g["i"] = hybrid[int(g["B"])]
        elif by_layer_kind and (int(g["i"]) in hybrid) != (".mamba_decoder." in src):
            continue
        return src.format(**g)
    raise KeyError(f"{key}: no row of the {cfg.model_type} key table writes this parameter")


class Shards:
    """The tensors of a checkpoint folder, from the files its index names (or the single file), read one at a time.

    A safetensors file is memory-mapped only while one of its tensors is copied out, so resident memory holds
    the tensors a load keeps, never a whole shard (mapped pages count as resident while mapped).
    """

    def __init__(self, path: Path):
        self.file: dict[str, Path] = {}  # checkpoint key -> its file
        self.shape: dict[str, tuple] = {}
        self._bins: dict[Path, dict] = {}  # pytorch_model*.bin, memory-mapped by torch.load
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if (path / index_name).exists():
                try:
                    weight_map = json.loads((path / index_name).read_text())["weight_map"]
                    files = {f: [k for k, g in weight_map.items() if g == f] for f in dict.fromkeys(weight_map.values())}
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                    raise CheckpointError(f"{path / index_name}: not a valid index ({e})") from None
                for f, keys in files.items():
                    present = self._open(path / f)
                    missing = [k for k in keys if k not in present]
                    if missing:
                        raise CheckpointError(f"{path / f} lacks {missing[:3]} which the index lists")
                    self._add(path / f, keys, present)
                return
            if (path / single).exists():
                present = self._open(path / single)
                self._add(path / single, list(present), present)
                return
        raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")

    def _open(self, f: Path) -> dict[str, tuple]:
        """{key: shape} of a weights file, reading only its header (safetensors)."""
        if not f.exists():
            raise CheckpointError(f"{f}: file named by the index is missing")
        with self._reading(f):
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as sf:
                    return {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
            self._bins[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            return {k: tuple(v.shape) for k, v in self._bins[f].items()}

    def _add(self, f: Path, keys: list[str], shapes: dict[str, tuple]) -> None:
        for k in keys:
            self.file[k], self.shape[k] = f, shapes[k]

    def get(self, key: str) -> torch.Tensor:
        f = self.file[key]
        if f in self._bins:
            return self._bins[f][key]
        with self._reading(f), safe_open(str(f), framework="pt") as sf:
            return sf.get_tensor(key)

    @staticmethod
    @contextlib.contextmanager
    def _reading(f: Path):
        try:
            yield
        except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"{f}: unreadable or truncated weights file ({e})") from None


def key_plan(keys: list[str], cfg: Config, quantized: bool) -> dict[str, list[str]]:
    """Our parameter name -> the checkpoint keys holding it: one, or several copies of a shared weight (a
    duplicated shared block; the LM head of a tied model, saved untied) that must be equal. A quantized
    checkpoint's projections hold `.scale` beside `.weight`, under the same names; its head is its own even when
    tied (a quantized copy of the embedding)."""
    if any(k.startswith("model.layers.") for k in keys):
        keys = [k for k in keys if not k.startswith(LEGACY_PREFIXES)]
    plan: dict[str, list[str]] = {}
    unexpected = []
    for key in keys:
        stem, scale = (key[:-len(".scale")] + ".weight", True) if key.endswith(".scale") else (key, False)
        name = hf_to_native(stem, cfg)
        if name is None or scale and not quantized:
            unexpected.append(key)
            continue
        if scale:
            name = name[:-len("weight")] + "scale"
        if cfg.tie_word_embeddings and name == "lm_head.weight" and not quantized:
            name = "embed_tokens.weight"  # an untied copy of the tied head
        plan.setdefault(name, []).append(key)
    if unexpected:
        plan["<unexpected>"] = unexpected
    return plan


def check_plan(plan: dict[str, list[str]], shapes: dict[str, tuple], expected: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError naming every missing, unexpected and misshapen tensor."""
    unexpected = plan.get("<unexpected>", []) + sorted(k for k in plan if k not in expected and k != "<unexpected>")
    missing = sorted(k for k in expected if k not in plan)
    wrong = [f"{k}: checkpoint {shapes[key]} vs config {tuple(v.shape)}"
             for k, v in expected.items() if k in plan for key in plan[k] if shapes[key] != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors, e.g. {missing[:4]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:4]}")
    if wrong:
        problems.append("shapes that contradict config.json (check hidden_size, mamba_d_state, n_mamba_heads, "
                        f"mamba_ngroups, adapter_rank, intermediate_size): {wrong[:4]}")
    if problems:
        raise CheckpointError("checkpoint does not match its config: " + "; ".join(problems))


def read_config(path: Path) -> Config | Zamba1Config:
    """The config.json at `path` as the config of the architecture its model_type names (Zamba2 when absent)."""
    d = read_json(path, f"no config.json at {path}")
    kind = d.get("model_type", "zamba2") if isinstance(d, dict) else None
    if kind not in ARCHITECTURES:
        raise UserError(f"{path}: model_type is {kind!r}; this package runs {' and '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[kind][0].from_json(path)


def stored_quantization(path: Path) -> Quantization | None:
    """The weight format a quantized checkpoint's config.json records (`zamba2 quantize`), or None."""
    d = read_json(path / "config.json", f"no config.json at {path}")
    q = d.get("quantization_config") if isinstance(d, dict) else None
    with naming(path / "config.json"):
        return None if q is None else Quantization.from_dict(q)


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         quantization: Quantization | None = None, revision: str | None = None) -> Zamba2LM:
    """Load a Hugging Face style Zamba2 or Zamba1 folder (official Hub layout or transformers' save_pretrained;
    config.json's model_type picks the architecture, read_config), or one that `zamba2 quantize` wrote (its weight
    format is in its config.json). `path` may be a Hub repo id instead (hub.resolve: downloaded at `revision`, or
    found in the Hugging Face cache); a folder that exists wins.

    Tensors are read one at a time and converted to `dtype`. With `quantization`, each projection is quantized
    as soon as its weights are read, so a float copy of the whole model never exists: the peak is the quantized
    model plus about one float tensor (bench/big_load.py measures it on the 7B shape). The result equals loading
    in float and quantizing after.
    """
    device = check_device(device)  # a clear error before reading gigabytes of weights (or downloading them)
    path = resolve(path, revision)
    cfg = read_config(path / "config.json")
    stored = stored_quantization(path)
    if stored and quantization not in (None, stored):
        raise UserError(f"{path} holds {stored.name} weights already; load it without asking for {quantization.name}")
    quantize = quantization if stored is None else None  # quantized while reading
    if (stored or quantize) and device.type != "cpu":
        raise UserError(f"{(stored or quantize).name} weights are a CPU format; the device is {device}")
    shards = Shards(path)
    plan = key_plan(list(shards.file), cfg, quantized=stored is not None)
    with torch.device("meta"):
        model = ARCHITECTURES[cfg.model_type][1](cfg)
    if stored:  # the quantized projections, empty, for the stored tensors to fill
        for name in [n[:-len(".scale")] for n in plan if n.endswith(".scale")]:
            parent, _, attr = name.rpartition(".")
            old = model.get_submodule(name) if name != "lm_head" or model.lm_head else None
            n, k = (old.weight.shape if old is not None else model.embed_tokens.weight.shape)
            new = stored.empty(n, k, old is not None and old.bias is not None)
            setattr(model.get_submodule(parent) if parent else model, attr, new)
    check_plan(plan, shards.shape, model.state_dict())
    pending: dict[str, dict[str, torch.Tensor]] = {}  # a projection's tensors until it has all (weight, bias)
    for name, keys in sorted(plan.items(), key=lambda kv: (str(shards.file[kv[1][0]]), kv[1][0])):
        value = shards.get(keys[0])
        for other in keys[1:]:  # copies of one shared weight must agree
            if not torch.equal(shards.get(other), value):
                raise CheckpointError(f"{other}: this copy of a shared weight differs from another copy ({name})")
        if value.is_floating_point() and not name.endswith(".scale"):
            value = value.to(device=device, dtype=dtype)
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if quantize and isinstance(module, Linear):
            pending.setdefault(owner, {})[attr] = value
            if len(pending[owner]) == len(module._parameters) - (module.bias is None):
                tensors = pending.pop(owner)
                new = quantize.layer(tensors["weight"], tensors.get("bias"))
                if new is None:  # stays in float
                    _assign(module, tensors)
                else:
                    parent, _, child = owner.rpartition(".")
                    setattr(model.get_submodule(parent), child, new)
            continue
        _assign(module, {attr: value})
    if quantize:
        if model.lm_head is None:  # tied: the head gets its own quantized copy, the lookup keeps the embedding
            model.lm_head = quantize.layer(model.embed_tokens.weight, None)
    if stored or quantize:
        model.quantized = (stored or quantize).name
        model.requires_grad_(False)
    return model.eval()


def _assign(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put loaded tensors in place of a module's (meta) parameters and buffers, as load_state_dict(assign=True)."""
    for attr, value in tensors.items():
        if attr in module._parameters:
            module._parameters[attr] = torch.nn.Parameter(value, requires_grad=module._parameters[attr].requires_grad)
        else:
            module._buffers[attr] = value


def save(model: Zamba2LM, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30,
         train_state: dict | None = None, state_dict: dict | None = None) -> None:
    """Write config.json + safetensors (sharded with an index past max_shard_bytes) in the transformers layout.

    `train_state` (optimizer, step, data position, ...) is written beside it as train_state.pt. A quantized
    model's projections are written as stored (`.weight` and `.scale`), its format in config.json.
    `state_dict` replaces model.state_dict(): the gathered full weights of an FSDP-sharded model.

    The folder is written beside the target and swapped in by rename, so a failure mid-save (full
    disk, kill) leaves any previous checkpoint at `path` intact.
    """
    quantization = Quantization.of(model)
    if quantization and train_state is not None:
        raise UserError(f"this model is {quantization.name}-quantized, for inference only: it cannot be trained")
    path = Path(path)
    cfg = model.config
    weights = model.state_dict() if state_dict is None else state_dict
    tensors = {_hf_key(k, cfg): v.detach().contiguous().cpu() for k, v in weights.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if quantization:  # recorded, so that every loader reads the weights as they are stored
            (tmp / "config.json").write_text(json.dumps({**cfg.to_dict(), "quantization_config": quantization.to_dict()},
                                                        indent=2) + "\n")
        else:
            cfg.save(tmp / "config.json")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for n, shard in enumerate(shards, 1):
                name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if train_state is not None:
            with open(tmp / "train_state.pt", "wb") as f:  # a Python file, so a full disk raises ENOSPC
                torch.save(train_state, f)
        _swap_in(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _no_space(e):
            kept = "the previous checkpoint is intact" if path.exists() else "nothing was written"
            raise UserError(f"no space left on device while saving {path}; {kept}") from None
        raise


def _hf_key(name: str, cfg: Config) -> str:
    """native_to_hf, and a quantized projection's scales beside its weight under the same name."""
    if name.endswith(".scale"):
        return native_to_hf(name[:-len("scale")] + "weight", cfg)[:-len("weight")] + "scale"
    return native_to_hf(name, cfg)


def _no_space(e: BaseException | None) -> bool:
    """A full disk anywhere in the exception chain. torch.save reports it as a RuntimeError ("unexpected
    pos") with the OSError as its context, and safetensors as a SafetensorError holding the OS message."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace folder `path` by `tmp`; other files already in `path` (a tokenizer, say) are kept."""
    ours = ("config.json", "model.safetensors.index.json", "train_state.pt")
    if path.exists():
        for f in path.iterdir():
            if f.name in ours or f.name.startswith("model") and f.suffix == ".safetensors":
                continue
            if not (tmp / f.name).exists():
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
