"""Zamba1 (model_type "zamba") against transformers.ZambaForCausalLM on random tiny models in two shape families,
and against itself: cached decoding, prefill in pieces, left padding, saving.

transformers writes the checkpoint with save_pretrained; zamba2.load picks Zamba1 from its model_type.
"""

import json

import pytest
import torch

import zamba2
from conftest import hf_zamba1_reference, random_model
from zamba2.errors import UserError
from zamba2.model.checkpoint import CheckpointError
from zamba2.model.zamba1 import Zamba1LM
from zamba2.model.zamba1_config import Zamba1Config, hybrid_pattern, tiny

transformers = pytest.importorskip("transformers")

CHUNK = 16
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
            mamba_d_state=16, chunk_size=CHUNK)
CONFIGS = {
    # Zamba-7B-v1's family: two Mamba heads, d_state 16, the layer pattern from period/offset, dt rank "auto"
    "7b-like": dict(num_hidden_layers=9, n_mamba_heads=2, attn_layer_period=6, attn_layer_offset=4),
    # four heads, adjacent hybrid layers, GQA, explicit dt rank, biases on the projections and none on the conv
    "heads4": dict(num_hidden_layers=5, layers_block_type=["mamba", "hybrid", "hybrid", "mamba", "hybrid"],
                   n_mamba_heads=4, num_key_value_heads=2, mamba_dt_rank=5, mamba_d_state=8, mamba_proj_bias=True,
                   mamba_conv_bias=False),
}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    cfg = Zamba1Config(**{**BASE, **CONFIGS[request.param]})
    path = tmp_path_factory.mktemp(request.param)
    hf = hf_zamba1_reference(cfg, path)
    return hf, zamba2.load(path), path


def test_load_picks_zamba1(pair):
    _, ours, path = pair
    assert isinstance(ours, Zamba1LM) and json.loads((path / "config.json").read_text())["model_type"] == "zamba"


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


def test_cached_decode_equals_full_forward(pair):
    _, ours, _ = pair
    ids = torch.randint(0, 256, (2, 2 * CHUNK + 3))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(2)
        steps = torch.cat([ours(ids[:, t:t + 1], cache=cache) for t in range(ids.shape[1])], dim=1)
    assert rel_err(steps, full) <= 1e-5


@pytest.mark.parametrize("split", [1, 5, CHUNK, CHUNK + 3])
def test_prefill_in_pieces_equals_one_prefill(pair, split):
    _, ours, _ = pair
    ids = torch.randint(0, 256, (2, 2 * CHUNK + 5))
    with torch.no_grad():
        one = ours.new_cache(2)
        ref = ours(ids, cache=one)
        nxt_ref = ours(ids[:, :1], cache=one)
        pieces = ours.new_cache(2)
        out = torch.cat([ours(ids[:, :split], cache=pieces), ours(ids[:, split:], cache=pieces)], dim=1)
        nxt = ours(ids[:, :1], cache=pieces)
    assert rel_err(out, ref) <= 1e-5 and rel_err(nxt, nxt_ref) <= 1e-5
    for a, b in zip(one.ssm + one.conv, pieces.ssm + pieces.conv):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_left_padded_rows_equal_each_row_alone(pair):
    hf, ours, _ = pair
    ids = torch.randint(3, 256, (2, 21))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ids[1, :9] = 0
    with torch.no_grad():
        out = ours(ids, attention_mask=mask)
        alone = ours(ids[1:, 9:])
        ref = hf(ids, attention_mask=mask).logits
    assert rel_err(out[1, 9:], alone[0]) <= 1e-5
    assert rel_err(out[mask.bool()], ref[mask.bool()]) <= 1e-4
    generated = zamba2.generate(ours, ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(generated[1, 9:], zamba2.generate(ours, ids[1:, 9:], max_new_tokens=8)[0])


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_tokens_match(pair, batch):
    hf, ours, _ = pair
    ids = torch.randint(3, 256, (batch, 12))
    hf.generation_config.eos_token_id = None  # 20 tokens, no early stop
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert ref.shape[1] == 32
    assert torch.equal(zamba2.generate(ours, ids, max_new_tokens=20), ref)


def test_our_save_loads_in_transformers(pair, tmp_path):
    _, ours, _ = pair
    zamba2.save(ours, tmp_path / "ours")
    hf2 = transformers.ZambaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        assert rel_err(ours(ids), hf2(ids).logits) <= 1e-5
    again = zamba2.load(tmp_path / "ours")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def copy_shared_block(path, change=False):
    """Rewrite the checkpoint with the shared block copied under every hybrid layer (as a re-save may store it)."""
    from safetensors.torch import load_file, save_file

    cfg = Zamba1Config.from_json(path / "config.json")
    tensors = load_file(path / "model.safetensors")
    source = f"model.layers.{cfg.hybrid_layer_ids[0]}.shared_transf."
    for i in cfg.hybrid_layer_ids[1:]:
        for k, v in list(tensors.items()):
            if k.startswith(source):
                tensors[k.replace(source, f"model.layers.{i}.shared_transf.")] = v + (1 if change else 0)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_shared_block_copies_load_once_and_must_agree(pair, tmp_path):
    _, ours, _ = pair
    zamba2.save(ours, tmp_path / "m")
    copy_shared_block(tmp_path / "m")
    again = zamba2.load(tmp_path / "m")
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in ours.parameters())
    copy_shared_block(tmp_path / "m", change=True)
    with pytest.raises(CheckpointError, match="differs"):
        zamba2.load(tmp_path / "m")


def test_layer_pattern_is_transformers():
    for n, period, offset in [(76, 6, 4), (9, 6, 4), (5, 2, 0), (12, 3, 1)]:
        ref = transformers.ZambaConfig(num_hidden_layers=n, attn_layer_period=period, attn_layer_offset=offset)
        ours = Zamba1Config(num_hidden_layers=n, attn_layer_period=period, attn_layer_offset=offset)
        assert ours.layers_block_type == ["hybrid" if t == "hybrid" else "mamba" for t in ref.layers_block_type]


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(UserError, match="n_mamba_heads"):
        Zamba1Config(n_mamba_heads=0)
    with pytest.raises(UserError, match="mamba_dt_rank"):
        Zamba1Config(mamba_dt_rank="big")
    with pytest.raises(UserError, match="hidden_mamba_act"):
        Zamba1Config(hidden_mamba_act="gelu")
    with pytest.raises(UserError, match="mamba_d_stat"):
        Zamba1Config.from_dict({"mamba_d_stat": 4})
    with pytest.raises(UserError, match="attention_head_dim"):
        Zamba1Config.from_dict({"hidden_size": 64, "num_hidden_layers": 4, "attention_head_dim": 7})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UserError, match="model_type"):
        zamba2.load(tmp_path)
    assert hybrid_pattern(9, 6, 4) == ["mamba", "mamba", "hybrid"] + ["mamba"] * 4 + ["hybrid", "mamba"]


def test_bfloat16_close_to_float32_and_decodes_like_its_forward():
    model = random_model(tiny())
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        ref = model(ids)
        model.to(torch.bfloat16)
        out = model(ids)
        assert rel_err(out.float(), ref) < 0.05
        cache = model.new_cache(2)
        steps = torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(ids.shape[1])], dim=1)
    assert rel_err(steps.float(), out.float()) < 0.05


def test_sharded_checkpoint_loads(pair, tmp_path):
    """The published layout: shards listed in model.safetensors.index.json."""
    _, ours, _ = pair
    zamba2.save(ours, tmp_path / "m", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = zamba2.load(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))
