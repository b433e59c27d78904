"""Model invariants: parameter sharing, cached decoding == parallel forward, padding, chunk size, bad input."""

import pytest
import torch

import zamba2
from conftest import random_model


def test_parameter_count_matches_config_formula():
    for cfg in (zamba2.tiny(), zamba2.tiny(num_mem_blocks=1, use_shared_attention_adapter=False),
                zamba2.tiny(tie_word_embeddings=False, add_bias_linear=True)):
        model = zamba2.Zamba2LM(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()


def test_released_1_2b_parameter_count():
    assert zamba2.preset("1.2b").num_parameters() == 1_215_064_704


def test_shared_blocks_are_one_tensor():
    model = zamba2.Zamba2LM(zamba2.tiny())  # hybrid layers 1, 3, 4 with 2 blocks: ABA
    blocks = [model.layers[i].block for i in (1, 3, 4)]
    assert blocks == [0, 1, 0]
    assert model.layers[1].q_adapter is not model.layers[4].q_adapter  # adapters are per visit
    names = [n for n in model.state_dict() if "shared_blocks" in n and "q_proj" in n]
    assert names == ["shared_blocks.0.self_attn.q_proj.weight", "shared_blocks.1.self_attn.q_proj.weight"]


@pytest.mark.parametrize("length", [5, 8, 20])
def test_decode_step_by_step_equals_full_forward(length):
    model = random_model()
    ids = torch.randint(0, 128, (2, length))
    full = model(ids)
    cache = model.new_cache(2)
    steps = torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(length)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)


def test_prefill_split_at_every_position_equals_one_prefill():
    model = random_model()
    ids = torch.randint(0, 128, (1, 19))  # chunk is 8: splits below, at and across chunk boundaries
    full = model(ids)
    for split in range(1, 19):
        cache = model.new_cache(1)
        first = model(ids[:, :split], cache=cache)
        second = model(ids[:, split:], cache=cache)
        torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-4, atol=1e-5)


def test_three_turn_continuation():
    model = random_model()
    ids = torch.randint(0, 128, (2, 30))
    full = model(ids)
    cache = model.new_cache(2)
    parts = [model(ids[:, a:b], cache=cache) for a, b in ((0, 11), (11, 12), (12, 30))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)


def test_left_padded_batch_equals_each_sequence_alone():
    model = random_model()
    a, b = torch.randint(1, 128, (1, 17)), torch.randint(1, 128, (1, 6))
    pad = 17 - 6
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    batch = model(ids, attention_mask=mask)
    torch.testing.assert_close(batch[0], model(a)[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch[1, pad:], model(b)[0], rtol=1e-4, atol=1e-5)
    # and the padded batch keeps agreeing when decoding from its cache
    cache = model.new_cache(2)
    model(ids, attention_mask=mask, cache=cache)
    nxt = torch.randint(1, 128, (2, 3))
    out = model(nxt, cache=cache)
    torch.testing.assert_close(out[1], model(torch.cat([b, nxt[1:]], 1))[0, -3:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_chunk_size_is_only_numerics(chunk):
    model = random_model()
    ids = torch.randint(0, 128, (2, 40))
    ref = model(ids)
    model.config.chunk_size = chunk
    torch.testing.assert_close(model(ids), ref, rtol=1e-4, atol=1e-5)


def test_bfloat16_close_to_float32():
    model = random_model()
    ids = torch.randint(0, 128, (2, 24))
    ref = model(ids)
    out = model.to(torch.bfloat16)(ids).float()
    assert (out - ref).abs().max() / ref.abs().max() < 0.05


def test_token_ids_out_of_range_are_rejected():
    model = random_model()
    with pytest.raises(ValueError, match="token id 128 is outside the vocabulary"):
        model(torch.tensor([[1, 128]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 3]]))


def test_bad_shapes_are_rejected():
    model = random_model()
    with pytest.raises(ValueError, match="input_ids must be"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="cache holds"):
        model(torch.ones(2, 5, dtype=torch.long), cache=model.new_cache(3))


def test_loss_falls_when_overfitting_one_batch():
    model = random_model().train()
    ids = torch.randint(0, 128, (2, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_packed_documents_equal_documents_alone():
    model = random_model()
    lengths = [5, 11, 3, 13]  # boundaries inside and across chunks of 8
    docs = [torch.randint(0, 128, (1, n)) for n in lengths]
    ids = torch.cat(docs, 1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], 1)
    packed = model(ids, doc_ids=doc_ids)
    alone = torch.cat([model(d) for d in docs], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
