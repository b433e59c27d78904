"""Operating the server, on a real `zamba2 serve` process: the API key, /metrics, request ids and the access log,
and the SIGTERM drain."""

import json
import signal
import time

import httpx
import pytest

import zamba2
from conftest import random_model
from helpers.process import output, start_server

openai = pytest.importorskip("openai")
NAME = "tiny-zamba2"
KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("operate") / "ckpt"
    zamba2.save(random_model(zamba2.tiny(vocab_size=32000, max_position_embeddings=8192)), path)
    return path


@pytest.fixture(scope="module")
def keyed(checkpoint):
    proc, url = start_server(checkpoint, NAME, env={"ZAMBA2_API_KEY": KEY})
    yield proc, url
    proc.terminate()
    proc.wait(30)


def test_every_route_but_health_needs_the_key(keyed):
    _, url = keyed
    assert httpx.get(f"{url}/health").status_code == 200
    for wrong in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        for r in (httpx.get(f"{url}/v1/models", headers=wrong), httpx.get(f"{url}/metrics", headers=wrong),
                  httpx.post(f"{url}/v1/completions", headers=wrong, json={"prompt": "x"})):
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key" and "API key" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [NAME]


def test_metrics_request_ids_and_the_access_log(keyed):
    proc, url = keyed
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    raw = client.completions.with_raw_response.create(model=NAME, prompt="Hello there", max_tokens=5, temperature=0,
                                                      extra_body={"ignore_eos": True})
    rid = raw.headers["x-request-id"]
    assert len(rid) == 32 and raw.parse().usage.completion_tokens == 5
    assert httpx.get(f"{url}/v1/models").status_code == 401
    mine = httpx.get(f"{url}/health", headers={"x-request-id": "trace-42"})
    assert mine.headers["x-request-id"] == "trace-42"
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['zamba2_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert samples['zamba2_requests_total{route="/v1/models",status="401"}'] >= 1
    assert samples["zamba2_generation_tokens_total"] >= 5 and samples["zamba2_prompt_tokens_total"] >= 3
    assert samples["zamba2_time_to_first_token_seconds_count"] >= 1
    assert samples["zamba2_inter_token_latency_seconds_count"] >= 4
    assert samples["zamba2_queue_depth"] == 0 and samples["zamba2_running_rows"] == 0
    assert "zamba2_prefix_cache_hits_total" in samples and "zamba2_prefix_cache_bytes" in samples
    time.sleep(0.2)
    log = output(proc)
    line = next(line for line in log.splitlines() if rid in line)
    assert '"POST /v1/completions" 200' in line and " ms " in line
    assert any('"GET /health" 200' in line and "id=trace-42" in line for line in log.splitlines())


def stream_events(r: httpx.Response):
    for line in r.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


@pytest.mark.parametrize("timeout, finishes", [(60, True), (0.5, False)])
def test_sigterm_drains_then_exits_0(checkpoint, timeout, finishes):
    """Running streams finish (or, past the drain timeout, end with an error), new requests get 503, exit 0."""
    proc, url = start_server(checkpoint, NAME, "--drain-timeout", str(timeout))
    try:
        body = {"model": NAME, "prompt": "x", "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            events = stream_events(r)
            next(events)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            late = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "y", "max_tokens": 2})
            assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
            assert httpx.get(f"{url}/health").status_code == 503
            rest = list(events)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    if finishes:
        assert rest[-1]["usage"]["completion_tokens"] == 3000
        assert sum(1 for e in rest if e["choices"] and e["choices"][0]["finish_reason"] == "length") == 1
    else:
        assert "shutting down" in rest[-1]["error"]["message"]
    assert "drained" in output(proc)


def test_a_demo_like_checkpoint_serves_chat_under_its_run_name(tmp_path):
    """What `zamba2 demo` writes (a checkpoint carrying its tokenizer and chat template, in runs/<name>/checkpoint)
    serves chat completions under the run's name."""
    from zamba2.text.chat import save_tokenizer

    folder = tmp_path / "demo" / "checkpoint"
    zamba2.save(random_model(zamba2.tiny(vocab_size=32000)), folder)
    save_tokenizer(zamba2.load_tokenizer(), folder)
    proc, url = start_server(folder, None)
    try:
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["demo"]
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "demo", "max_tokens": 3,
                                                            "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    finally:
        proc.terminate()
        proc.wait(30)
