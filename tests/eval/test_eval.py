"""Evaluation: sliding-window perplexity, and the lm-eval model `zamba2` checked against direct computation,
against the perplexity code, and against the server through lm-eval's own `local-completions` client."""

import json
import os
import math
import subprocess
import sys

import pytest
import torch

import zamba2
from conftest import random_model
from helpers.process import ROOT, start_server
from zamba2.eval.perplexity import document_nll, perplexity

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from zamba2.eval.harness import Zamba2Harness, evaluate  # noqa: E402  (registers the `zamba2` model)

TEXT = ("The river ran quietly past the old mill, where the wheel had not turned for forty years, "
        "and the children of the village told stories about the miller who had vanished one winter night.")
PAIRS = [("The capital of France is", " Paris"), ("Two plus two makes", " four, of course"), ("", "Hello there"),
         ("A hybrid model mixes state space layers with", " attention")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "ckpt"
    zamba2.save(random_model(zamba2.tiny(vocab_size=32000, max_position_embeddings=256)), path)
    return path


@pytest.fixture(scope="module")
def harness(checkpoint):
    return Zamba2Harness(pretrained=str(checkpoint), batch_size=3)


def requests(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


@torch.no_grad()
def test_sliding_window_scores_every_token_once_with_its_window(harness):
    model, tok = harness.model, harness.tok
    ids = tok.encode(TEXT)
    n, window, stride = len(ids), 16, 5
    nll, count = document_nll(model, ids, window, stride)
    assert count == n - 1
    expected = 0.0
    for i in range(1, n):  # token i is scored by the window that first reaches it; brute force, one forward each
        start = 0 if i < window else ((i - window) // stride + 1) * stride
        expected -= float(model(torch.tensor([ids[start:i + 1]]))[0, -2].log_softmax(-1)[ids[i]])
    assert nll == pytest.approx(expected, rel=1e-5)
    full = -model(torch.tensor([ids]))[0, :-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).sum()
    assert document_nll(model, ids, n + 3, 4)[0] == pytest.approx(float(full), rel=1e-5)  # one window: one forward
    with pytest.raises(ValueError, match="stride"):
        document_nll(model, ids, 8, 8)


def test_perplexity_command(checkpoint, harness, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"text": "Short one."}) + "\n{broken\n")
    out = subprocess.run([sys.executable, "-m", "zamba2", "eval", "perplexity", "--model", str(checkpoint),
                          "--data", str(data), "--window", "32", "--stride", "8"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr
    r = perplexity(harness.model, harness.tok, [TEXT, "Short one."], window=32, stride=8)
    assert f"perplexity {r['perplexity']:.3f}" in out.stdout and "skipped 1 malformed" in out.stdout
    assert r["tokens"] == len(harness.tok.encode(TEXT)) + len(harness.tok.encode("Short one.")) - 2
    out = subprocess.run([sys.executable, "-m", "zamba2", "eval", "perplexity", "--model", str(checkpoint),
                          "--data", str(tmp_path / "missing.txt")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 2 and "missing.txt" in out.stderr and "Traceback" not in out.stderr


@torch.no_grad()
def test_loglikelihood_equals_direct_computation(harness):
    model, tok = harness.model, harness.tok
    got = harness.loglikelihood(requests("loglikelihood", PAIRS))  # batch 3: rows of different lengths, left-padded
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        whole = tok.encode(context + continuation, add_bos=False)
        ctx = tok.encode(context, add_bos=False) if context else [tok.bos_id]  # an empty context is just BOS
        cont = whole[len(ctx):] if context else whole
        lp = model(torch.tensor([ctx + cont]))[0, len(ctx) - 1:-1].log_softmax(-1)  # rows predicting cont
        assert logprob == pytest.approx(float(lp.gather(1, torch.tensor(cont)[:, None]).sum()), abs=1e-4)
        assert greedy == (lp.argmax(-1).tolist() == cont)


def test_rolling_loglikelihood_equals_the_perplexity_windows(checkpoint):
    small = Zamba2Harness(pretrained=str(checkpoint), max_length=19, batch_size=4)
    (rolled,) = small.loglikelihood_rolling(requests("loglikelihood_rolling", [(TEXT,)]))
    ids = small.tok.encode(TEXT)  # BOS + 38 tokens: lm-eval's windows predict 19 tokens each, disjoint
    assert len(ids) == 1 + 2 * 19  # (a shorter last window would get extra context, unlike the stride scheme)
    assert rolled == pytest.approx(-document_nll(small.model, ids, window=20, stride=19)[0], rel=1e-5)


def test_generate_until_stops_at_the_stop_string(harness):
    model, tok = harness.model, harness.tok
    context = "Q: What is two plus two?\nA:"
    ids = tok.encode(context, add_bos=False)
    new = zamba2.generate(model, torch.tensor([ids]), 12)[0, len(ids):].tolist()
    text = tok.decode(ids[-8:] + new)[len(tok.decode(ids[-8:])):]
    stop = text[4:6]
    (free,) = harness.generate_until(requests("generate_until", [(context, {"until": ["@@@"], "max_gen_toks": 12})]))
    (cut,) = harness.generate_until(requests("generate_until", [(context, {"until": [stop], "max_gen_toks": 12})]))
    assert free == text and cut == text[:text.find(stop)]


def test_harness_runs_the_bundled_tasks_end_to_end(checkpoint, tmp_path):
    out = subprocess.run([sys.executable, "-m", "zamba2", "eval", "lm-eval", "--model", str(checkpoint),
                          "--tasks", "zamba2_mc,zamba2_ppl,zamba2_qa", "--limit", "4",
                          "--output", str(tmp_path / "r.json")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1"}, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "r.json").read_text())
    assert 0 <= results["zamba2_mc"]["acc,none"] <= 1 and results["zamba2_ppl"]["word_perplexity,none"] > 1
    assert 0 <= results["zamba2_qa"]["exact_match,none"] <= 1
    with pytest.raises(ValueError, match="unknown task"):  # a ValueError: the command prints it on one line
        evaluate(str(checkpoint), ["no_such_task"])


def test_server_loglikelihoods_through_local_completions_match(checkpoint, harness):
    """lm-eval's own `local-completions` client (echo + logprobs, the server's /tokenize) against our server."""
    from lm_eval.api.registry import get_model

    proc, url = start_server(checkpoint, "tiny")
    try:
        remote = get_model("local-completions")(base_url=f"{url}/v1/completions", model="tiny",
                                                 tokenizer_backend="remote", max_length=256, num_concurrent=2)
        assert remote.tokenizer_backend == "remote"
        served = remote.loglikelihood(requests("loglikelihood", PAIRS))
        (served_rolling,) = remote.loglikelihood_rolling(requests("loglikelihood_rolling", [(TEXT,)]))
    finally:
        proc.terminate()
        proc.wait(30)
    direct = harness.loglikelihood(requests("loglikelihood", PAIRS))
    for (a, ga), (b, gb) in zip(served, direct):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert math.isfinite(served_rolling)
    (rolled,) = Zamba2Harness(pretrained=str(checkpoint), max_length=255).loglikelihood_rolling(
        requests("loglikelihood_rolling", [(TEXT,)]))
    assert served_rolling == pytest.approx(rolled, abs=1e-3)
