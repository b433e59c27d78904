"""Parity with transformers.Zamba2ForCausalLM (the reference implementation) on random tiny models.

Each config mirrors a shape family of the released checkpoints. transformers writes the checkpoint
with save_pretrained; we load it with zamba2.load and compare float32 logits and greedy tokens.
"""

import pytest
import torch

import zamba2
from conftest import hf_reference

transformers = pytest.importorskip("transformers")

CHUNK = 16
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, adapter_rank=8,
            mamba_d_state=16, n_mamba_heads=4, chunk_size=CHUNK)
CONFIGS = {
    # one shared block, RoPE, q/k/v adapters, large d_state (Zamba2-1.2B)
    "1.2b-like": dict(num_hidden_layers=5, layers_block_type=["mamba", "mamba", "hybrid", "mamba", "hybrid"],
                      num_mem_blocks=1, use_mem_rope=True, use_shared_attention_adapter=True, mamba_d_state=32),
    # two alternating blocks, no RoPE, no attention adapters (Zamba2-2.7B)
    "2.7b-like": dict(num_hidden_layers=6, layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"],
                      num_mem_blocks=2, use_mem_rope=False, use_shared_attention_adapter=False),
    "ngroups2": dict(num_hidden_layers=4, layers_block_type=["hybrid", "mamba", "hybrid", "mamba"],
                     num_mem_blocks=2, use_mem_rope=True, use_shared_attention_adapter=True, mamba_ngroups=2),
    "gqa": dict(num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], num_mem_blocks=1,
                use_mem_rope=True, num_key_value_heads=2),
}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    cfg = zamba2.Config(**{**BASE, **CONFIGS[request.param]})
    path = tmp_path_factory.mktemp(request.param)
    hf = hf_reference(cfg, path)
    return hf, zamba2.load(path), path


@pytest.mark.parametrize("length", [1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + CHUNK // 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_logits_match(pair, length, batch):
    hf, ours, _ = pair
    ids = torch.randint(0, 256, (batch, length))
    with torch.no_grad():
        ref = hf(ids).logits
        assert rel_err(ours(ids), ref) <= 1e-4
        ours.config.chunk_size = 5  # our chunk boundaries differ from the reference's
        try:
            assert rel_err(ours(ids), ref) <= 1e-4
        finally:
            ours.config.chunk_size = CHUNK


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_tokens_match(pair, batch):
    hf, ours, _ = pair
    ids = torch.randint(3, 256, (batch, 12))
    hf.generation_config.eos_token_id = None  # 20 tokens, no early stop
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert ref.shape[1] == 32
    assert torch.equal(zamba2.generate(ours, ids, max_new_tokens=20), ref)


def test_greedy_with_eos_pads_like_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(3, 256, (4, 10))
    hf.generation_config.eos_token_id = 2
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(zamba2.generate(ours, ids, max_new_tokens=20, eos_token_id=2), ref)


def test_left_padding_matches(pair):
    hf, ours, _ = pair
    ids = torch.randint(3, 256, (2, 21))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ids[1, :9] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # what transformers' generate passes for left padding
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions).logits
        out = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert rel_err(out[real], ref[real]) <= 1e-4


def test_our_save_loads_in_transformers(pair, tmp_path):
    _, ours, _ = pair
    zamba2.save(ours, tmp_path / "ours")
    hf2 = transformers.Zamba2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        assert rel_err(ours(ids), hf2(ids).logits) <= 1e-5
