"""The prefix cache over real HTTP: concurrent multi-turn chats answered by a server with the cache equal those
answered by one without it (greedy and seeded sampling), and the hits show in /metrics."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import zamba2
from conftest import random_model
from helpers.process import start_server
from test_serve import TEMPLATE

openai = pytest.importorskip("openai")
NAME = "tiny-zamba2"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefix") / "ckpt"
    zamba2.save(random_model(zamba2.tiny(vocab_size=32000, max_position_embeddings=1024)), path)
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "chat_template": TEMPLATE}))
    on = start_server(path, NAME, "--prefill-chunk", "16")
    off = start_server(path, NAME, "--prefix-cache-mb", "0")
    yield on[1], off[1]
    for proc, _ in (on, off):
        proc.terminate()
        proc.wait(30)


def converse(url: str, index: int, turns: int = 3) -> list[str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    sampling = dict(temperature=0.9, seed=index) if index % 2 else dict(temperature=0)
    messages, answers = [{"role": "user", "content": f"Conversation {index}: tell me about rivers"}], []
    for turn in range(turns):
        r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, **sampling)
        answers.append(r.choices[0].message.content)
        messages += [{"role": "assistant", "content": answers[-1]},
                     {"role": "user", "content": f"and then, in turn {turn}?"}]
    return answers


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def test_concurrent_chats_with_the_cache_equal_those_without(servers):
    on, off = servers
    with ThreadPoolExecutor(6) as pool:
        with_cache = list(pool.map(lambda i: converse(on, i), range(6)))
        without = list(pool.map(lambda i: converse(off, i), range(6)))
    assert with_cache == without
    assert metric(on, "zamba2_prefix_cache_hits_total") >= 6 * 2  # every later turn restores the earlier one
    assert metric(on, "zamba2_prefilled_tokens_total") < 0.6 * metric(on, "zamba2_prompt_tokens_total")
    assert metric(off, "zamba2_prefix_cache_lookups_total") == 0


def test_echo_logprobs_with_hits_over_http(servers):
    """lm-eval's loglikelihood requests (echo + logprobs, several continuations of one context) hit the cache and
    score every prompt token as the uncached server does."""
    on, off = servers
    context = "The history of the river begins in the mountains, where snow melts every spring and" * 2
    prompts = [context + ending for ending in (" flows", " runs down", " turns into a lake", " stops")]
    hits = metric(on, "zamba2_prefix_cache_hits_total")
    for prompt in prompts:
        a, b = (httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 0,
                                                          "echo": True, "logprobs": 2}).json()["choices"][0]["logprobs"]
                for url in (on, off))
        assert a["tokens"] == b["tokens"] and a["token_logprobs"][0] is None
        assert a["token_logprobs"][1:] == pytest.approx(b["token_logprobs"][1:], abs=1e-4)
        assert [sorted(t) for t in a["top_logprobs"][1:]] == [sorted(t) for t in b["top_logprobs"][1:]]
    assert metric(on, "zamba2_prefix_cache_hits_total") - hits >= 2
