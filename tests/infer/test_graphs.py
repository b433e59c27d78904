"""The CUDA-graph decode step (zamba2/infer/graphs.py) against Zamba2LM.forward.

On the CPU, GraphDecoder runs its static step without a graph: these tests check the step itself (KV written at
a slot from a device tensor, attention over the whole capacity with the valid mask) and the loading of a
prefilled cache. The tests marked `cuda` capture and replay the graph on a GPU."""

import pytest
import torch

import zamba2
from zamba2.infer import graphs
from zamba2.ops import kernels
from zamba2.infer.step import prefill
from zamba2.model.zamba1_config import tiny as zamba1_tiny

from conftest import random_model


@pytest.fixture
def torch_code(monkeypatch):
    monkeypatch.setattr(kernels, "ENABLED", False)  # the reference: forward's plain torch code


def left_padded(vocab: int, device="cpu"):
    ids = torch.randint(0, vocab, (3, 11), device=device)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    return ids, mask


CONFIGS = {"zamba2": zamba2.tiny, "gqa": lambda: zamba2.tiny(num_key_value_heads=2),
           "no-rope": lambda: zamba2.tiny(use_mem_rope=False), "zamba1": zamba1_tiny}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_static_step_equals_forward(torch_code, config):
    model = random_model(CONFIGS[config]())
    ids, mask = left_padded(model.config.vocab_size)
    with torch.no_grad():
        cache = model.new_cache(3)
        logits = prefill(model, ids, cache, mask, prefill_chunk=5)[:, -1]
        graph = graphs.GraphDecoder(model, 3, 32)
        graph.load(cache)
        for _ in range(12):  # past the prompt's 11 slots and a chunk (8)
            token = logits.argmax(-1)
            logits = model(token[:, None], cache=cache, logits_to_keep=1)[:, -1]
            torch.testing.assert_close(graph.step(token), logits, rtol=1e-5, atol=1e-5)
    assert graph.cache.length == cache.length
    for a, b in zip(graph.cache.ssm + graph.cache.conv, cache.ssm + cache.conv):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(graph.cache.positions, cache.positions)


def test_graph_decoder_rejects_what_does_not_fit():
    model = random_model()
    cache = model.new_cache(2)
    with torch.no_grad():
        prefill(model, torch.randint(0, 100, (2, 6)), cache)
        with pytest.raises(ValueError, match="does not fit"):
            graphs.GraphDecoder(model, 3, 16).load(cache)
        graph = graphs.GraphDecoder(model, 2, 8)
        graph.load(cache)
        graph.step(torch.tensor([1, 2]))
        graph.step(torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="capacity"):
            graph.step(torch.tensor([1, 2]))


def test_no_graphs_off_the_gpu():
    with graphs.claim(random_model(), 1, 10) as graph:
        assert graph is None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", ["zamba2", "zamba1"])
def test_generate_with_cuda_graphs_equals_eager(monkeypatch, dtype, config):
    model = random_model(CONFIGS[config]()).to("cuda", dtype)
    ids, mask = left_padded(model.config.vocab_size, "cuda")
    fast = zamba2.generate(model, ids, 20, attention_mask=mask)
    assert any(k[0] == 3 for k in graphs._DECODERS[model][1])  # the graph ran
    monkeypatch.setattr(graphs, "ENABLED", False)
    eager = zamba2.generate(model, ids, 20, attention_mask=mask)
    assert torch.equal(fast, eager)


@pytest.mark.cuda
def test_cuda_graphs_follow_the_model(monkeypatch):
    """An in-place weight change reaches the graph (it reads the parameter's memory); a replaced parameter gets a
    new graph."""
    model = random_model().cuda()
    ids = torch.randint(0, model.config.vocab_size, (1, 7), device="cuda")
    zamba2.generate(model, ids, 5)
    first = graphs._DECODERS[model][1][(1, graphs.MIN_CAPACITY)]
    with torch.no_grad():
        model.final_layernorm.weight.mul_(-1)
        model.embed_tokens.weight = torch.nn.Parameter(model.embed_tokens.weight * 1.5)
    out = zamba2.generate(model, ids, 5)
    assert graphs._DECODERS[model][1][(1, graphs.MIN_CAPACITY)] is not first
    monkeypatch.setattr(graphs, "ENABLED", False)
    assert torch.equal(out, zamba2.generate(model, ids, 5))


@pytest.mark.cuda
def test_interleaved_streams_do_not_share_a_graph():
    """A second generator running while the first holds the graph decodes eagerly, with the same tokens."""
    model = random_model().cuda()
    ids = torch.randint(0, model.config.vocab_size, (2, 7), device="cuda")
    first, second = zamba2.stream(model, ids, 10), zamba2.stream(model, ids, 10)
    pairs = [(next(first), next(second)) for _ in range(10)]
    assert all(torch.equal(a, b) for a, b in pairs)
    assert torch.equal(torch.stack([a for a, _ in pairs], 1), zamba2.generate(model, ids, 10)[:, 7:])
