"""The server as users run it: a real `zamba2 serve` process on a loopback port, driven by the openai client
(completions, chat, streaming) and by raw HTTP for the error cases."""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import zamba2
from conftest import random_model
from helpers.process import ROOT, start_server

openai = pytest.importorskip("openai")

# Mistral-instruct style: BOS, [INST] turns, EOS after each assistant answer
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
            "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
NAME = "tiny-zamba2"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "ckpt"
    zamba2.save(random_model(zamba2.tiny(vocab_size=32000, max_position_embeddings=256)), path)  # Mistral vocabulary
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "chat_template": TEMPLATE}))
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, url = start_server(checkpoint, NAME, "--max-batch", "16", "--max-n", "4", "--max-queue", "128",
                             "--max-body-bytes", "1000000")
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(checkpoint):
    """The same checkpoint in this process: what the library itself produces."""
    return zamba2.load(checkpoint), zamba2.load_tokenizer(checkpoint)


def greedy_text(local, ids, n):
    model, tok = local
    out = zamba2.generate(model, torch.tensor([ids]), n, eos_token_id=model.config.eos_token_ids)[0, len(ids):]
    out = out.tolist()
    if 2 in out:
        out = out[:out.index(2)]
    return tok.decode(ids[-8:] + out)[len(tok.decode(ids[-8:])):]


def test_help_lists_serve_and_eval():
    out = subprocess.run([sys.executable, "-m", "zamba2", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.returncode == 0 and "serve" in out.stdout and "eval" in out.stdout


def test_models_health_and_tokenizer_endpoints(client, server, local):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    ids = httpx.post(f"{server}/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert ids == local[1].encode("Hello world")
    assert httpx.post(f"{server}/tokenize", json={"prompt": "</s>", "add_special_tokens": False}).json()["tokens"] == [2]
    assert httpx.post(f"{server}/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello world"
    info = httpx.get(f"{server}/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["chat_template"] == TEMPLATE


def test_completion_equals_the_library(client, local):
    prompt = "The capital of France is"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0)
    ids = local[1].encode(prompt)
    assert r.choices[0].text == greedy_text(local, ids, 10)
    assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == len(ids) + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("length", "stop")
    # token-id prompts and several prompts at once
    r = client.completions.create(model=NAME, prompt=[ids, ids[:3]], max_tokens=6, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [greedy_text(local, ids, 6),
                                                                          greedy_text(local, ids[:3], 6)]


def test_streaming_gives_the_same_text_then_usage_and_done(client, server):
    kw = dict(model=NAME, prompt="Once upon a time", max_tokens=12, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 12 or chunks[-2].choices[0].finish_reason == "stop"
    with httpx.stream("POST", f"{server}/v1/completions", json={**kw, "stream": True, "logprobs": 2}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    events = [json.loads(line[6:]) for line in lines[:-1]]
    streamed = [t for e in events if e["choices"] for t in e["choices"][0]["logprobs"]["token_logprobs"]]
    assert len(streamed) == events[-1]["usage"]["completion_tokens"]  # one logprob per generated token


def test_chat_renders_the_template(client, local):
    messages = [{"role": "user", "content": "Tell me a story"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    ids = [1] + local[1].encode("[INST] Tell me a story [/INST]", add_bos=False)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy_text(local, ids, 8)
    assert r.usage.prompt_tokens == len(ids)
    streamed = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == r.choices[0].message.content
    scored = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                            top_logprobs=2)
    content = scored.choices[0].logprobs.content
    assert len(content) == scored.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy: the top token


def test_echo_logprobs_are_the_prompt_scores(client, local):
    """What lm-eval's local-completions sends for a loglikelihood request."""
    model, tok = local
    ids = tok.encode("The quick brown fox jumps")
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].log_softmax(-1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
    assert r.choices[0].text.startswith(tok.decode(ids))


def test_stop_strings_n_and_seeds(client):
    base = client.completions.create(model=NAME, prompt="a b c", max_tokens=16, temperature=0).choices[0].text
    assert len(base) > 6
    stop = base[len(base) // 2:][:3]
    r = client.completions.create(model=NAME, prompt="a b c", max_tokens=16, temperature=0, stop=["@@", stop])
    assert r.choices[0].text == base[:base.find(stop)] and r.choices[0].finish_reason == "stop"
    kw = dict(model=NAME, prompt="a b c", max_tokens=8, temperature=1.0, n=3, seed=5, extra_body={"top_k": 40})
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in first.choices}) > 1  # ... yet the n choices differ
    assert first.usage.prompt_tokens == 4 and 3 <= first.usage.completion_tokens <= 3 * 8  # the prompt counts once


def error(r: httpx.Response, status: int, words: str):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"], err


def test_bad_requests_get_openai_errors_and_the_server_lives(server):
    url = f"{server}/v1/completions"
    error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON")
    error(httpx.post(url, json={"model": NAME}), 400, "prompt")
    error(httpx.post(url, json={"model": NAME, "prompt": "x", "max_tokens": "ten"}), 400, "integer")
    error(httpx.post(url, json={"model": NAME, "prompt": "x", "temperature": "hot"}), 400, "number")
    error(httpx.post(url, json={"model": NAME, "prompt": "x", "n": 5}), 400, "n must be at most 4")
    error(httpx.post(url, json={"model": NAME, "prompt": "x", "max_tokens": -1}), 400, "greater than or equal")
    error(httpx.post(url, json={"model": NAME, "prompt": "x", "max_tokens": 10_000}), 400, "maximum context length")
    error(httpx.post(url, json={"model": NAME, "prompt": [5] * 300, "max_tokens": None}), 400, "maximum context length")
    error(httpx.post(url, json={"model": NAME, "prompt": [1, 99999]}), 400, "outside the vocabulary")
    error(httpx.post(url, json={"model": NAME, "prompt": []}), 400, "empty")
    error(httpx.post(url, json={"model": NAME, "prompt": "x", "frequency_penalty": 1}), 400, "not supported")
    error(httpx.post(url, json={"model": "gpt-4", "prompt": "x"}), 404, "does not exist")
    error(httpx.post(f"{server}/v1/chat/completions", json={"model": NAME, "messages": []}), 400, "messages")
    error(httpx.post(f"{server}/v1/chat/completions", json={"model": NAME, "messages": [{"content": "hi"}]}), 400,
          "role")
    error(httpx.get(f"{server}/v1/nothing"), 404, "Not Found")
    error(httpx.post(url, json={"model": NAME, "prompt": "x", "seed": 2**63}), 400, "seed")
    error(httpx.post(url, json={"model": NAME, "prompt": "x", "seed": -1}), 400, "seed")
    # 64 prompts x n=4 can never fit a queue of 128: a 400 naming the limit, not a 503 "retry later"
    error(httpx.post(url, json={"model": NAME, "prompt": ["x"] * 64, "n": 4, "max_tokens": 1}), 400,
          "queues at most 128 (--max-queue)")
    error(httpx.post(url, json={"model": NAME, "prompt": "x" * 1_000_001}), 413, "at most 1000000 (--max-body-bytes)")
    big = json.dumps({"model": NAME, "prompt": "x" * 1_000_001}).encode()  # no length announced: counted as it comes
    error(httpx.post(url, content=iter([big[:500_000], big[500_000:]]), headers={"content-type": "application/json"}),
          413, "--max-body-bytes")
    ok = httpx.post(url, json={"model": NAME, "prompt": "x", "max_tokens": 2, "seed": 2**63 - 1, "n": 2})
    assert ok.status_code == 200, ok.text
    ok = httpx.post(url, json={"model": NAME, "prompt": "x", "max_tokens": 2, "unknown_field": 1})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_chat_without_a_template_is_a_clear_error(checkpoint, local, tmp_path):
    from fastapi.testclient import TestClient

    from zamba2.serve.app import create_app
    from zamba2.serve.server import Server

    server = Server(local[0], local[1], tmp_path, NAME)  # tmp_path: no tokenizer_config.json
    with TestClient(create_app(server)) as http:
        r = http.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "hi"}]})
    error(r, 400, "no chat template")


def test_prompts_are_tokenized_off_the_event_loop(local, checkpoint, monkeypatch):
    """A long prompt takes seconds to tokenize; on the event loop it would stall every other request (/health)."""
    import asyncio

    from fastapi.testclient import TestClient

    from zamba2.serve.app import create_app
    from zamba2.serve.server import Server

    server = Server(local[0], local[1], checkpoint, NAME)
    on_loop, encode = [], server.codec.encode

    def encode_and_note_the_thread(*a, **k):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no event loop in this thread: a worker thread
            on_loop.append(False)
        return encode(*a, **k)

    monkeypatch.setattr(server.codec, "encode", encode_and_note_the_thread)
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with TestClient(create_app(server)) as http:
        r = http.post("/v1/completions", json={"model": NAME, "prompt": ["a", "b"], "max_tokens": 1})
        assert r.status_code == 200
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
        assert http.post("/tokenize", json={"prompt": "a"}).status_code == 200
    assert on_loop == [False] * 4


def test_a_client_that_disconnects_frees_its_row(server):
    steps = httpx.get(f"{server}/health").json()["steps"]
    with httpx.stream("POST", f"{server}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 250,
                                                                "temperature": 0, "stream": True,
                                                                "ignore_eos": True}) as r:
        assert next(r.iter_lines()).startswith("data: ")
    deadline = time.time() + 10
    while httpx.get(f"{server}/health").json()["active"] and time.time() < deadline:
        time.sleep(0.02)
    health = httpx.get(f"{server}/health").json()
    assert health["active"] == 0 and health["steps"] - steps < 150  # it left long before its 250 tokens


def test_64_concurrent_requests_match_sent_alone_and_share_steps(client, server):
    prompts = [f"Request number {i} says" + " more" * (i % 7) for i in range(64)]
    kw = dict(model=NAME, max_tokens=16, temperature=0)

    def send(p):
        return client.completions.create(prompt=p, **kw).choices[0].text

    alone = [send(p) for p in prompts]  # one at a time
    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(send, prompts, timeout=120))
    assert together == alone
    # requests really shared decode steps; the throughput this gains is measured by bench/serve_load.py
    assert httpx.get(f"{server}/health").json()["peak_batch"] >= 8
