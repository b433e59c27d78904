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
