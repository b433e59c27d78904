"""Multi-process training under torchrun: process group, FSDP2 sharding, full state dicts for saving.

`torchrun --nproc-per-node N -m zamba2 train ...` starts N copies of the trainer. Each Mamba layer
(its mixer, norms, and the linear and adapters of its shared-block visit) is one FSDP2 unit. The
root unit holds the embedding, the shared attention blocks, the final norm and the LM head. The
shared blocks must be in the root: they are called by several layers, and the root keeps its
parameters gathered for the whole forward and backward. Their gradients then accumulate over every
visit before one reduce-scatter.

Without torchrun (WORLD_SIZE unset) every function here is a no-op, so one code path serves both cases.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def setup(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device); joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, dev


def shard(model: torch.nn.Module) -> None:
    """Apply FSDP2 in place: one unit per layer, the rest (shared blocks included) in the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def model_state(model: torch.nn.Module) -> dict:
    """The full (unsharded) state dict on CPU; collective, and only rank 0 receives the tensors."""
    return get_model_state_dict(model, options=FULL)


def optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Full optimizer state keyed by parameter name, so 1 and N processes can resume each other."""
    return get_optimizer_state_dict(model, opt, options=FULL)


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
