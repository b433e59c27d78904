"""Shared test helpers: tiny configs, seeded models, transformers reference checkpoints written on the fly."""

import pytest
import torch

import zamba2


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_model(cfg=None, seed=0, **overrides) -> zamba2.Zamba2LM:
    """Our model with random weights, the norms and D perturbed too so that every parameter matters."""
    cfg = cfg or zamba2.tiny(**overrides)
    torch.manual_seed(seed)
    model = (zamba2.Zamba1LM if cfg.model_type == "zamba" else zamba2.Zamba2LM)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "norm.weight", ".D")):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_config(cfg: zamba2.Config):
    from transformers import Zamba2Config

    d = cfg.to_dict()
    for k in ("architectures", "model_type", "use_shared_mlp_adapter"):
        d.pop(k)
    return Zamba2Config(**d)


def hf_reference(cfg: zamba2.Config, path, seed=0):
    """A random transformers Zamba2ForCausalLM saved with save_pretrained at `path`; returns it (eval, fp32)."""
    from transformers import Zamba2ForCausalLM

    torch.manual_seed(seed)
    model = Zamba2ForCausalLM(hf_config(cfg)).eval()
    with torch.no_grad():  # transformers inits norms to 1 and D to 1: perturb them so they are checked
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "norm.weight", ".D")):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def hf_zamba1_reference(cfg, path, seed=0):
    """A random transformers ZambaForCausalLM (Zamba1) for our Zamba1Config, saved with save_pretrained at `path`;
    returns it (eval, fp32). Norms and D are perturbed so that they are checked."""
    from transformers import ZambaConfig, ZambaForCausalLM

    d = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type")}
    torch.manual_seed(seed)
    model = ZambaForCausalLM(ZambaConfig(**d)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", ".D", "dt_proj_bias")):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model
