"""HybridCache on its own: slot growth, reserved slots and positions, row selection, joining batches, trim."""

import torch

import zamba2
from zamba2.model.cache import HybridCache

CFG = zamba2.tiny()


def kv(cache: HybridCache, t: int, fill: float) -> torch.Tensor:
    return torch.full((cache.batch_size, CFG.num_key_value_heads, t, CFG.attention_head_dim), fill)


def test_shapes_follow_the_config():
    cache = HybridCache(CFG, batch_size=2, capacity=5)
    assert len(cache.conv) == len(cache.ssm) == CFG.num_hidden_layers
    assert cache.conv[0].shape == (2, CFG.conv_dim, CFG.mamba_d_conv - 1)
    assert cache.ssm[0].shape == (2, CFG.n_mamba_heads, CFG.mamba_headdim, CFG.mamba_d_state)
    assert cache.ssm[0].dtype == torch.float32  # whatever the model's dtype
    assert sorted(cache.keys) == CFG.hybrid_layer_ids and cache.keys[CFG.hybrid_layer_ids[0]].shape[2] == 5
    assert cache.capacity == 5 and cache.length == 0


def test_extend_reserves_slots_counts_positions_and_grows_by_doubling():
    cache = HybridCache(CFG, batch_size=2)
    assert cache.extend(torch.tensor([[False, True, True], [True, True, True]]), 3) == 0  # row 0 left-padded
    assert cache.length == 3 and cache.positions.tolist() == [2, 3] and cache.capacity == 16
    assert cache.extend(None, 20) == 3 and cache.capacity == 32 and cache.positions.tolist() == [22, 23]
    layer = CFG.hybrid_layer_ids[0]
    k, v = cache.write_kv(layer, 3, kv(cache, 20, 1.0), kv(cache, 20, 2.0))
    assert k.shape[2] == v.shape[2] == 23 and k[:, :, 3:].eq(1).all() and v[:, :, :3].eq(0).all()


def test_select_keeps_and_reorders_rows():
    cache = HybridCache(CFG, batch_size=3, capacity=4)
    cache.extend(None, 2)
    for i in range(3):
        cache.ssm[0][i] = i
    cache.select(torch.tensor([2, 0]))
    assert cache.batch_size == 2 and cache.ssm[0][:, 0, 0, 0].tolist() == [2.0, 0.0]
    assert cache.valid.shape == (2, 4) and cache.positions.shape == (2,)


def test_append_right_aligns_used_slots_and_trim_drops_unused_ones():
    layer = CFG.hybrid_layer_ids[0]
    long, short = HybridCache(CFG, 1), HybridCache(CFG, 1)
    long.extend(None, 5)
    long.write_kv(layer, 0, kv(long, 5, 1.0), kv(long, 5, 1.0))
    short.extend(None, 2)
    short.write_kv(layer, 0, kv(short, 2, 2.0), kv(short, 2, 2.0))
    long.append(short)
    assert long.batch_size == 2 and long.length == 5 and long.positions.tolist() == [5, 2]
    assert long.valid[:, :5].tolist() == [[True] * 5, [False] * 3 + [True] * 2]  # both rows end at slot 5
    assert long.keys[layer][1, 0, 3:5, 0].tolist() == [2.0, 2.0]
    long.select(torch.tensor([1]))  # the long row leaves: its leading slots are now unused
    long.trim()
    assert long.length == 2 and long.valid[:, :2].all() and long.keys[layer][0, 0, :2, 0].tolist() == [2.0, 2.0]


def test_reset_empties_the_cache():
    cache = HybridCache(CFG, batch_size=1, capacity=4)
    cache.extend(None, 3)
    cache.ssm[1].fill_(1.0)
    cache.reset()
    assert cache.length == 0 and not cache.valid.any() and cache.positions.eq(0).all() and cache.ssm[1].eq(0).all()
