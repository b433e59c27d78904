"""The batching engine on its own: rows joining and leaving a running batch give what each gives alone."""

import queue
import threading

import pytest
import torch

import zamba2
from conftest import random_model
from zamba2.serve.engine import Engine, QueueFull, Request


@pytest.fixture(scope="module")
def model():
    return random_model(zamba2.tiny(vocab_size=128, max_position_embeddings=256))


class Collector:
    """Gathers one request's events on the engine thread; `wait` returns its tokens and finish reason."""

    def __init__(self):
        self.events = queue.Queue()
        self.first = threading.Event()

    def __call__(self, event):
        self.events.put(event)
        self.first.set()

    def wait(self, timeout=60):
        tokens, prompt = [], None
        while True:
            e = self.events.get(timeout=timeout)
            if e.prompt is not None:
                prompt = e.prompt
            if e.token is not None:
                tokens.append(e.token)
            if e.finish:
                return tokens, e.finish, prompt, e


def alone(model, prompt, max_tokens, eos=(), **kw):
    out = zamba2.generate(model, torch.tensor([prompt]), max_tokens, eos_token_id=list(eos), **kw)[0, len(prompt):]
    out = out.tolist()
    for i, t in enumerate(out):  # generate pads after EOS; the engine stops there
        if t in eos:
            return out[:i + 1]
    return out


def test_rows_joining_at_different_times_match_generate_alone(model):
    g = torch.Generator().manual_seed(1)
    specs = []
    for i in range(14):
        prompt = torch.randint(3, 128, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        sampling = dict(temperature=0.9, top_k=50, top_p=0.9, seed=i) if i % 3 == 2 else {}
        specs.append((prompt, int(torch.randint(1, 24, (1,), generator=g)), sampling))
    engine = Engine(model, max_batch=5).start()  # fewer rows than requests: some wait in the queue
    try:
        collectors = []
        for i, (prompt, n, sampling) in enumerate(specs):
            c = Collector()
            engine.submit(Request(prompt, n, c, eos=[2, 7], **sampling))
            collectors.append(c)
            if i % 4 == 3:  # let the running batch decode a while before the next ones join
                c.first.wait(30)
        results = [c.wait() for c in collectors]
    finally:
        engine.stop()
    assert engine.peak_batch == 5 and engine.steps > 0
    for (prompt, n, sampling), (tokens, finish, _, _) in zip(specs, results):
        expected = alone(model, prompt, n, eos=(2, 7), **sampling)
        assert tokens == expected
        assert finish == ("stop" if expected[-1] in (2, 7) else "length")


def test_logprobs_and_echo_equal_the_forward(model):
    prompt = [1, 5, 9, 33, 4, 80]
    engine = Engine(model).start()
    try:
        c = Collector()
        engine.submit(Request(prompt, 3, c, logprobs=2, echo_logprobs=True))
        tokens, finish, prompt_lp, _ = c.wait()
    finally:
        engine.stop()
    full = prompt + tokens
    with torch.no_grad():
        lp = model(torch.tensor([full]))[0].log_softmax(-1)  # [t, vocab]
    assert prompt_lp[0] is None and len(prompt_lp) == len(prompt)
    for i in range(1, len(prompt)):
        chosen, top = prompt_lp[i]
        assert chosen == pytest.approx(float(lp[i - 1, prompt[i]]), abs=1e-4)
        assert [t for t, _ in top] == lp[i - 1].topk(2).indices.tolist()
    assert tokens == lp[len(prompt) - 1:-1].argmax(-1).tolist()[:3] and finish == "length"


def test_cancel_frees_the_row_and_the_queue_is_bounded(model):
    engine = Engine(model, max_batch=1, max_queue=2).start()
    try:
        long, short = Collector(), Collector()
        slow = Request([1, 2, 3], 200, long)
        engine.submit(slow)
        long.first.wait(30)
        engine.submit(Request([1, 4], 2, short))  # waits for the only row
        with pytest.raises(QueueFull):
            engine.submit(*[Request([1], 1, Collector()) for _ in range(2)])  # all or none
        engine.cancel(slow)
        tokens, finish, _, _ = short.wait()
        assert finish == "length" and len(tokens) == 2
        assert long.events.qsize() < 200  # it stopped well before max_tokens
    finally:
        engine.stop()


def test_a_failing_request_does_not_stop_the_engine(model):
    engine = Engine(model).start()
    try:
        bad, good = Collector(), Collector()
        engine.submit(Request([1, 500], 2, bad))  # id outside the vocabulary: the forward raises
        engine.submit(Request([1, 4], 2, good))
        _, finish, _, event = bad.wait()
        assert finish == "error" and "vocabulary" in event.error
        assert good.wait()[1] == "length"
    finally:
        engine.stop()


def run(engine, *requests):
    """Submit (prompt, max_tokens, kwargs) requests together; returns each one's (tokens, finish, prompt logprobs)."""
    collectors = [Collector() for _ in requests]
    engine.submit(*[Request(p, n, c, **kw) for (p, n, kw), c in zip(requests, collectors)])
    return [c.wait()[:3] for c in collectors]


def test_prefix_cache_hits_are_exact_multi_turn_and_sampled(model):
    """Turn after turn, each prompt extends the last prompt + completion: every turn restores a snapshot, and
    what it generates (greedy or seeded) equals generate alone. Pieces of 7 tokens interleave with decoding."""
    engine = Engine(model, max_batch=4, prefix_cache_bytes=2**26, prefill_chunk=7).start()
    g = torch.Generator().manual_seed(3)
    try:
        talks = [torch.randint(3, 128, (5 + 9 * i,), generator=g).tolist() for i in range(3)]
        for turn in range(3):
            specs = [(t, 6, dict(temperature=0.8, top_k=20, seed=i) if i == 2 else {}) for i, t in enumerate(talks)]
            for (prompt, n, kw), (tokens, finish, _) in zip(specs, run(engine, *specs)):
                assert tokens == alone(model, prompt, n, **kw) and finish == "length"
            talks = [t + tokens + torch.randint(3, 128, (4,), generator=g).tolist()
                     for t, (tokens, _, _) in zip(talks, run(engine, *specs))]  # the same answers again: all hit
        hits, lookups = engine.metrics.cache_hits._value.get(), engine.metrics.cache_lookups._value.get()
        # the first turn misses twice: a snapshot at a prompt's very end cannot serve the same prompt again (its
        # last token must run, for the logits of the first new token)
        assert lookups == 18 and hits == 12
        prefilled = engine.metrics.prefilled_tokens._value.get()
        assert prefilled < 0.5 * engine.metrics.prompt_tokens._value.get()
    finally:
        engine.stop()


def test_echo_logprobs_with_hits_equal_the_forward(model):
    """lm-eval's loglikelihood: many continuations of one context, with echo + logprobs. The second request
    leaves a snapshot at the context's end (the branch point), the others hit it; every prompt score is exact."""
    engine = Engine(model, prefix_cache_bytes=2**26).start()
    g = torch.Generator().manual_seed(4)
    context = torch.randint(3, 128, (40,), generator=g).tolist()
    prompts = [context + torch.randint(3, 128, (3 + i,), generator=g).tolist() for i in range(5)]
    try:
        results = [run(engine, (p, 0, dict(logprobs=3, echo_logprobs=True)))[0] for p in prompts]
        assert engine.metrics.cache_hits._value.get() == 3
        plain = run(engine, (prompts[0] + [5, 6], 2, {}))  # a plain request hits a scored snapshot too
        assert plain[0][0] == alone(model, prompts[0] + [5, 6], 2)
    finally:
        engine.stop()
    for prompt, (_, finish, scores) in zip(prompts, results):
        with torch.no_grad():
            lp = model(torch.tensor([prompt]))[0].log_softmax(-1)  # [t, vocab]
        assert finish == "length" and scores[0] is None and len(scores) == len(prompt)
        for i in range(1, len(prompt)):
            chosen, top = scores[i]
            assert chosen == pytest.approx(float(lp[i - 1, prompt[i]]), abs=1e-4)
            assert [t for t, _ in top] == lp[i - 1].topk(3).indices.tolist()


def test_prefix_cache_restores_exact_states_and_keeps_its_budget(model):
    from zamba2.model.cache import HybridCache
    from zamba2.serve.prefix_cache import PrefixCache

    def state_after(tokens):
        cache = model.new_cache(1)
        with torch.no_grad():
            model(torch.tensor([tokens]), cache=cache)
        return cache.row_state(0)

    a, b = list(range(3, 40)), list(range(3, 20)) + list(range(60, 90))
    sa, sb = state_after(a), state_after(b)
    per_token = sum(k.nbytes + v.nbytes for k, v in zip(sa.keys.values(), sa.values.values())) // len(a)
    pc = PrefixCache(sa.nbytes + sb.nbytes + 10 * per_token)  # a and b fit (they share 17 tokens of KV), not a third
    pc.insert(a, sa)
    pc.insert(b, sb)  # splits a's edge after 17 tokens
    assert pc.lookup(a + [1], 38).depth == len(a) and pc.lookup(a, len(a) - 1).depth == 0
    hit = pc.lookup(b + [7, 8], 100)
    assert hit.depth == len(b) and hit.branch == len(b)
    restored = HybridCache.from_row(model.config, hit.state, 64)
    assert all(torch.equal(x, y) for x, y in zip(restored.conv + restored.ssm, sb.conv + sb.ssm))
    for j in sb.keys:  # KV assembled from the two edges of b's path
        assert torch.equal(restored.keys[j][:, :, :len(b)], sb.keys[j])
        assert torch.equal(restored.values[j][:, :, :len(b)], sb.values[j])
    assert restored.length == len(b) and int(restored.positions[0]) == len(b)
    assert pc.lookup(list(range(3, 25)) + [1, 1], 30).branch == 22  # shares 22 tokens with a, no snapshot there
    pc.insert(list(range(80, 120)), state_after(list(range(80, 120))))  # over budget: the LRU one (a) goes
    assert pc.lookup(a + [1], 38).depth == 0 and pc.lookup(b + [1], 99).depth == len(b)
    assert len(pc.snapshots) == 2 and pc.nbytes <= pc.max_bytes
    for node in list(pc.snapshots):
        pc._evict(node)
    assert pc.nbytes == 0 and not pc.root.children


def test_the_engine_steps_through_the_graph_decoder_generate_chooses(model, monkeypatch):
    """On a GPU the engine decodes through a CUDA-graph step per batch-size bucket, chosen by the decoder choice
    `stream` uses (generate.decoder). Forced here on the CPU, where the graph's static step runs without a graph:
    rows joining and leaving (re-padded to a power of two each time) still give what generate gives alone."""
    from zamba2.infer import graphs

    monkeypatch.setattr(graphs, "wanted", lambda model: True)
    g = torch.Generator().manual_seed(5)
    specs = [(torch.randint(3, 128, (3 + 4 * i,), generator=g).tolist(), 4 + 3 * i) for i in range(5)]
    engine = Engine(model, max_batch=5, prefix_cache_bytes=2**24, prefill_chunk=8).start()
    try:
        results = run(engine, *[(p, n, {}) for p, n in specs])
    finally:
        engine.stop()
    buckets = {b for b, _ in graphs._DECODERS[model][1]}
    assert buckets <= {1, 2, 4, 8} and buckets & {4, 8}  # 3 or 5 rows ran padded to 4 or 8
    monkeypatch.setattr(graphs, "wanted", lambda model: False)
    for (prompt, n), (tokens, _, _) in zip(specs, results):
        assert tokens == alone(model, prompt, n)


def test_short_prompts_waiting_together_are_prefilled_in_one_forward(model, monkeypatch):
    groups = []
    together = Engine._prefill_together
    monkeypatch.setattr(Engine, "_prefill_together",
                        lambda self, group: groups.append(len(group)) or together(self, group))
    g = torch.Generator().manual_seed(6)
    specs = [(torch.randint(3, 128, (2 + 5 * i,), generator=g).tolist(), 5, {}) for i in range(6)]
    engine = Engine(model, max_batch=6, prefix_cache_bytes=2**24).start()
    try:
        results = run(engine, *specs)
    finally:
        engine.stop()
    assert groups and max(groups) >= 2
    for (prompt, n, _), (tokens, _, _) in zip(specs, results):
        assert tokens == alone(model, prompt, n)
