"""Speculative decoding in the server (serve/engine.py with infer/speculative.py): a request alone in the batch
checks proposals, several alone or together switch between that and batched steps, and the tokens stay those of
plain decoding; over HTTP with --draft and --prompt-lookup, streamed and not, and the per-request opt-out."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import zamba2
from conftest import random_model
from helpers.process import start_server
from test_engine import Collector, alone
from zamba2.serve.engine import Engine, Request

openai = pytest.importorskip("openai")
NAME = "tiny-zamba2"
REPETITIVE = [5, 6, 7, 8, 9, 10, 11] * 4  # prompt lookup proposes here, and is accepted


@pytest.fixture(scope="module")
def model():
    return random_model(zamba2.tiny(vocab_size=128, max_position_embeddings=256))


def nudged(model):
    """The model with its weights nudged: a draft that mostly agrees, and sometimes not."""
    draft = random_model(model.config)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return draft


@pytest.mark.parametrize("draft, k", [("nudged", None), ("other", 3), ("prompt-lookup", 3)])
def test_rows_alone_and_together_give_the_plain_tokens(model, draft, k, monkeypatch):
    """A speculating row, others joining it (it catches up on the tokens it lags by), the batch shrinking to one
    again, a prompt continuing a speculating row's prefix-cache snapshot: each row's tokens are generate's.
    k None: the adaptive schedule."""
    lags = []
    catch_up = Engine._catch_up

    def noted(self):
        if len(self._rows) == 1:
            lags.append(self._rows[0].unfed)
        catch_up(self)

    monkeypatch.setattr(Engine, "_catch_up", noted)
    drafter = {"nudged": nudged(model), "other": random_model(model.config, seed=1)}.get(draft, draft)
    engine = Engine(model, max_batch=4, prefix_cache_bytes=2**26, draft=drafter, num_speculative=k).start()
    g = torch.Generator().manual_seed(0)
    specs = [(REPETITIVE, 40)] + [(torch.randint(3, 128, (n,), generator=g).tolist(), 12 + n) for n in (3, 9, 17, 30)]
    try:
        results = []
        first = Collector()
        engine.submit(Request(specs[0][0], specs[0][1], first, eos=[2]))
        first.first.wait(30)
        collectors = []
        for prompt, n in specs[1:]:  # they join the first row one by one
            c = Collector()
            engine.submit(Request(prompt, n, c, eos=[2]))
            collectors.append(c)
            c.first.wait(30)
        results = [first.wait()] + [c.wait() for c in collectors]
        tokens = results[0][0]
        follow = Collector()  # its prompt is the first row's whole text: a prefix-cache hit at its end
        engine.submit(Request(specs[0][0] + tokens + [12, 13], 10, follow, eos=[2]))
        results.append(follow.wait())
        specs.append((specs[0][0] + tokens + [12, 13], 10))
    finally:
        engine.stop()
    for (prompt, n), (tokens, finish, _, _) in zip(specs, results):
        assert tokens == alone(model, prompt, n, eos=(2,))
    value = engine.metrics.registry.get_sample_value
    assert value("zamba2_speculative_steps_total") > 0 and value("zamba2_speculative_proposed_tokens_total") > 0
    assert value("zamba2_prefix_cache_hits_total") >= 1
    if draft != "nudged":
        assert engine.peak_batch >= 2
    if draft == "other":  # a draft that seldom agrees: rejected checks leave the row behind its text
        assert max(lags) > 1


def test_logprobs_seeds_and_the_opt_out_take_plain_steps(model):
    engine = Engine(model, draft="prompt-lookup", num_speculative=3).start()
    value = engine.metrics.registry.get_sample_value
    try:
        for kw in (dict(speculative=False), dict(logprobs=2), dict(temperature=0.8, seed=3)):
            c = Collector()
            engine.submit(Request(REPETITIVE, 12, c, **kw))
            tokens, _, _, last = c.wait()
            sampling = {k: v for k, v in kw.items() if k in ("temperature", "seed")}
            assert tokens == alone(model, REPETITIVE, 12, **sampling)
            assert value("zamba2_speculative_steps_total") == 0
        c = Collector()
        engine.submit(Request(REPETITIVE, 12, c, temperature=0.8))  # unseeded sampling speculates
        assert len(c.wait()[0]) == 12 and value("zamba2_speculative_steps_total") > 0
    finally:
        engine.stop()


def test_a_bad_draft_is_refused_at_start(model):
    with pytest.raises(zamba2.errors.UserError, match="vocabulary"):
        Engine(model, draft=random_model(zamba2.tiny(vocab_size=64)))
    with pytest.raises(zamba2.errors.UserError, match="num_speculative"):
        Engine(model, num_speculative=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("speculative") / "ckpt"
    zamba2.save(random_model(zamba2.tiny(vocab_size=32000, max_position_embeddings=256)), path)  # Mistral vocabulary
    template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "chat_template": template}))
    return path


@pytest.fixture(scope="module")
def local(checkpoint):
    return zamba2.load(checkpoint), zamba2.load_tokenizer(checkpoint)


@pytest.fixture(scope="module", params=["draft", "prompt-lookup"])
def server(request, checkpoint):
    """A server whose draft is an int8 copy of the model, or prompt lookup."""
    flags = ["--draft", str(checkpoint), "--draft-int8"] if request.param == "draft" else ["--prompt-lookup"]
    proc, url = start_server(checkpoint, NAME, "--num-speculative", "3", *flags)
    yield url
    proc.terminate()
    proc.wait(30)


def greedy(local, ids, n):
    """What plain decoding gives: the text after `ids` up to EOS or n tokens."""
    model, tok = local
    out = alone(model, ids, n, eos=model.config.eos_token_ids)
    out = out[:-1] if out and out[-1] in model.config.eos_token_ids else out
    return tok.decode(ids[-8:] + out)[len(tok.decode(ids[-8:])):]


def metric(url, name: str = "zamba2_speculative_steps_total") -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def test_served_text_is_plain_decodings_alone_and_together(server, local):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)
    prompts = ["one two three one two three one two", "The capital of France is", "a b c a b c a b c",
               "Request number 3 says more more"]
    expected = [greedy(local, local[1].encode(p), 24) for p in prompts]
    before = metric(server)
    kw = dict(model=NAME, max_tokens=24, temperature=0)
    for p, text in zip(prompts, expected):  # alone: speculating
        assert client.completions.create(prompt=p, **kw).choices[0].text == text
        chunks = client.completions.create(prompt=p, stream=True, **kw)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert metric(server) > before and metric(server, "zamba2_speculative_accepted_tokens_total") > 0

    def send(p):
        return client.completions.create(prompt=p, **kw).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:  # together, rows joining and leaving: both modes in turn
        assert list(pool.map(send, prompts * 2, timeout=120)) == expected * 2
    stop = expected[0][len(expected[0]) // 2:][:3]  # a stop string inside the accepted tokens, streamed or not
    r = client.completions.create(prompt=prompts[0], stop=[stop], **kw)
    assert r.choices[0].text == expected[0][:expected[0].find(stop)] and r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(prompt=prompts[0], stop=[stop], stream=True, **kw)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    short = client.completions.create(prompt=prompts[0], **{**kw, "max_tokens": 5})
    assert short.usage.completion_tokens <= 5 and expected[0].startswith(short.choices[0].text)


def test_chat_logprobs_and_the_opt_out(server, local):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Say it again: la la la la la la"}]
    ids = local[1].encode("[INST] Say it again: la la la la la la [/INST]", add_bos=False)
    kw = dict(model=NAME, messages=messages, max_tokens=16, temperature=0)
    text = greedy(local, ids, 16)
    assert client.chat.completions.create(**kw).choices[0].message.content == text
    chunks = client.chat.completions.create(stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    before = metric(server)
    assert client.chat.completions.create(extra_body={"speculative": False}, **kw).choices[0].message.content == text
    scored = client.chat.completions.create(logprobs=True, top_logprobs=1, **kw)  # logprobs: plain steps
    assert scored.choices[0].message.content == text
    assert len(scored.choices[0].logprobs.content) == scored.usage.completion_tokens
    assert metric(server) == before
    bad = httpx.post(f"{server}/v1/chat/completions", json={**kw, "speculative": "no"})
    assert bad.status_code == 400 and "speculative" in bad.json()["error"]["message"]
