"""Sampling and generation semantics."""

import pytest
import torch

import zamba2
from conftest import random_model


def test_greedy_is_argmax_of_full_forward():
    model = random_model()
    ids = torch.randint(3, 128, (2, 9))
    out = zamba2.generate(model, ids, max_new_tokens=6)
    for t in range(6):  # teacher-forced check of every generated token
        assert torch.equal(model(out[:, :9 + t])[:, -1].argmax(-1), out[:, 9 + t])


def test_stream_yields_what_generate_returns():
    model = random_model()
    ids = torch.randint(3, 128, (1, 5))
    streamed = torch.stack(list(zamba2.stream(model, ids, 7, temperature=0.9, seed=3)), 1)
    assert torch.equal(zamba2.generate(model, ids, 7, temperature=0.9, seed=3)[:, 5:], streamed)


def test_seeded_sampling_is_reproducible_and_varies_with_seed():
    model = random_model()
    ids = torch.randint(3, 128, (1, 5))
    a = zamba2.generate(model, ids, 30, temperature=1.5, seed=1)
    assert torch.equal(a, zamba2.generate(model, ids, 30, temperature=1.5, seed=1))
    assert not torch.equal(a, zamba2.generate(model, ids, 30, temperature=1.5, seed=2))


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]]).repeat(400, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(zamba2.sample(logits, 1.0, top_k=2, generator=gen).tolist()) == {0, 1}
    # p(0)=0.70, p(1)=0.26: top_p 0.5 keeps only token 0, 0.9 keeps 0 and 1
    assert set(zamba2.sample(logits, 1.0, top_p=0.5, generator=gen).tolist()) == {0}
    assert set(zamba2.sample(logits, 1.0, top_p=0.9, generator=gen).tolist()) == {0, 1}
    with pytest.raises(ValueError):
        zamba2.sample(logits, -1.0)


def test_eos_stops_each_sequence_and_pads_after_it():
    model = random_model()
    ids = torch.randint(3, 128, (3, 6))
    free = zamba2.generate(model, ids, 10)
    eos = int(free[0, 8])  # make row 0's third new token the EOS
    out = zamba2.generate(model, ids, 10, eos_token_id=eos)
    for row in range(3):
        new = out[row, 6:].tolist()
        if eos in new:
            k = new.index(eos)
            assert new[:k + 1] == free[row, 6:6 + k + 1].tolist()
            assert all(t == model.config.pad_token_id for t in new[k + 1:])
        else:
            assert new == free[row, 6:6 + len(new)].tolist()


def test_left_padded_generation_equals_alone():
    model = random_model()
    a, b = torch.randint(3, 128, (1, 10)), torch.randint(3, 128, (1, 4))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)])
    mask = (ids != 0).long()
    mask[0] = 1
    out = zamba2.generate(model, ids, 8, attention_mask=mask)
    assert torch.equal(out[1, 6:], zamba2.generate(model, b, 8)[0])
    assert torch.equal(out[0], zamba2.generate(model, a, 8)[0])


@pytest.mark.parametrize("piece", [1, 3, 7, 20])
def test_prompt_prefilled_in_pieces_equals_one_prefill(piece):
    """Long prompts go through the cache in pieces (pieces of padding only, too): same tokens as one piece."""
    model = random_model()
    ids = torch.randint(3, 128, (2, 20))
    ids[1, :9] = 0
    mask = (ids != 0).long()
    whole = zamba2.generate(model, ids, 6, attention_mask=mask)
    assert torch.equal(zamba2.generate(model, ids, 6, attention_mask=mask, prefill_chunk=piece), whole)


def test_int8_weights_generate_close_to_float():
    model = random_model(vocab_size=512, hidden_size=64)
    ids = torch.randint(3, 512, (2, 24))
    ref = model(ids)
    q = zamba2.quantize_int8(random_model(vocab_size=512, hidden_size=64))
    # every projection and the head; only the adapters' rank-4 up-projections (K=4) stay in float
    assert {type(m).__name__ for m in q.modules() if hasattr(m, "in_features")} == {"Linear"}
    assert all(m.in_features == 4 for m in q.modules() if type(m).__name__ == "Linear")
    assert q.lm_head.weight.dtype == torch.int8
    err = (q(ids) - ref).norm() / ref.norm()
    assert err < 0.02, err
    out = zamba2.generate(q, ids, 4)  # int8 decode (few rows) agrees with the int8 full forward (many rows)
    for t in range(4):
        assert torch.equal(q(out[:, :24 + t])[:, -1].argmax(-1), out[:, 24 + t])


def test_int4_weights_generate_close_to_float():
    model = random_model(vocab_size=512, hidden_size=64)
    ids = torch.randint(3, 512, (2, 24))
    ref = model(ids)
    q = zamba2.quantize_int4(random_model(vocab_size=512, hidden_size=64), group_size=32)
    # every projection and the head; only the adapters' rank-4 up-projections (K=4) stay in float
    assert all(m.in_features == 4 for m in q.modules() if type(m).__name__ == "Linear")
    assert q.lm_head.weight.dtype == torch.uint8 and q.embed_tokens.weight.dtype == torch.float32
    err = (q(ids) - ref).norm() / ref.norm()
    assert err < 0.3, err  # random weights, groups of 32: ~8% error per projection, through 5 layers and the head
    # int4 decode steps (few rows: the compiled GEMV, which also rounds its inputs to int8 per group) stay near the
    # int4 full forward (many rows: the dequantized weights times the inputs as they are)
    cache = q.new_cache(batch_size=2)
    q(ids[:, :20], cache=cache)
    steps = torch.stack([q(ids[:, t:t + 1], cache=cache)[:, -1] for t in range(20, 24)], 1)  # [2, 4, vocab]
    full = q(ids)[:, 20:]
    assert (steps - full).norm() / full.norm() < 0.1
    assert (steps.argmax(-1) == full.argmax(-1)).float().mean() >= 0.75
    with pytest.raises(ValueError, match="already int4"):
        zamba2.quantize_int8(q)


def test_prompt_longer_than_context_is_an_error():
    model = random_model(max_position_embeddings=16)
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        zamba2.generate(model, torch.ones(1, 10, dtype=torch.long), max_new_tokens=8)
    with pytest.raises(ValueError, match="empty prompt"):
        zamba2.generate(model, torch.ones(1, 0, dtype=torch.long), max_new_tokens=2)
