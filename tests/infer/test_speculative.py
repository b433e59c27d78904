"""Speculative decoding: cache rollback against token-by-token decoding, greedy outputs equal to plain decoding,
sampled outputs distributed as the model's (zamba2/infer/speculative.py)."""

import copy

import pytest
import torch

import zamba2
from conftest import random_model
from zamba2.infer import speculative
from zamba2.infer.step import decode_step, prefill, probabilities
from zamba2.ops import kernels


@pytest.fixture(params=[True, False], ids=["kernels", "torch"])
def backend(request, monkeypatch):
    """Both backends: the compiled CPU step and prefill where they build, and the model's torch code."""
    monkeypatch.setattr(kernels, "ENABLED", request.param and kernels.ENABLED)


def assert_caches_equal(a, b, exact=False):
    close = torch.equal if exact else (lambda x, y: torch.allclose(x, y, rtol=1e-4, atol=1e-5))
    assert a.length == b.length and torch.equal(a.positions, b.positions)
    assert torch.equal(a.valid[:, :a.length], b.valid[:, :b.length])
    assert not a.valid[:, a.length:].any()  # dropped slots are marked unused
    for x, y in zip(a.conv + a.ssm, b.conv + b.ssm):
        assert close(x, y)
    for i in a.keys:
        assert close(a.keys[i][:, :, :a.length], b.keys[i][:, :, :b.length])
        assert close(a.values[i][:, :, :a.length], b.values[i][:, :, :b.length])


@torch.inference_mode()
@pytest.mark.parametrize("prompt", [5, 8, 13])  # below, at and across the tiny model's chunk (8)
def test_rollback_to_every_accepted_count_equals_decoding_one_by_one(backend, prompt):
    """Check k tokens in one forward on a warm cache, keep j of them (restore + re-advance by the j kept, as the
    stream does in its next forward): the cache equals one that decoded those j tokens one at a time."""
    model, k = random_model(), 4
    ids = torch.randint(3, 128, (1, prompt))
    proposed = torch.randint(3, 128, (1, k))
    for j in range(k + 1):
        cache = model.new_cache(1)
        prefill(model, ids, cache)
        snap = cache.snapshot()
        model(proposed, cache=cache)
        if j < k:
            cache.restore(snap)
            if j:
                model(proposed[:, :j], cache=cache)
        reference = model.new_cache(1)
        prefill(model, ids, reference)
        for i in range(j):
            decode_step(model, proposed[:, i], reference)
        assert_caches_equal(cache, reference)
        # and it continues as the reference does
        token = torch.tensor([7])
        assert torch.allclose(decode_step(model, token, cache), decode_step(model, token, reference), atol=1e-4)


@torch.inference_mode()
def test_restore_is_bit_exact():
    model = random_model()
    cache = model.new_cache(1)
    prefill(model, torch.randint(3, 128, (1, 11)), cache)
    before = model.new_cache(1)
    prefill(model, torch.randint(3, 128, (1, 11)), before)  # other contents, overwritten below
    snap = cache.snapshot()
    for t, s in zip(before.conv + before.ssm, snap.conv + snap.ssm):
        t.copy_(s)
    before.keys = {i: t.clone() for i, t in cache.keys.items()}
    before.values = {i: t.clone() for i, t in cache.values.items()}
    before.valid, before.positions, before.length = cache.valid.clone(), cache.positions.clone(), cache.length
    model(torch.randint(3, 128, (1, 9)), cache=cache)  # grows the KV past its capacity too
    cache.restore(snap)
    assert_caches_equal(cache, before, exact=True)


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_equals_plain_decoding_with_any_drafter(backend, k):
    model = random_model()
    ids = torch.randint(3, 128, (1, 9))
    plain = zamba2.generate(model, ids, 24)
    perturbed = random_model()  # the model with its weights nudged: a draft that mostly agrees
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.02 * torch.randn_like(p))
    for draft in (model, perturbed, random_model(seed=1), "prompt-lookup"):
        assert torch.equal(zamba2.generate(model, ids, 24, draft=draft, num_speculative=k), plain)
    repetitive = torch.tensor([[5, 6, 7, 8, 9, 10, 11] * 4])  # prompt lookup proposes (and is accepted) here
    assert torch.equal(zamba2.generate(model, repetitive, 24, draft="prompt-lookup", num_speculative=k),
                       zamba2.generate(model, repetitive, 24))


def run(model, ids, new, **kw) -> dict:
    stats: dict = {}
    tokens = [int(t) for t in speculative.stream(model, ids, new, temperature=kw.pop("temperature", 0.0),
                                                 top_k=None, top_p=None, eos=set(), generator=None,
                                                 attention_mask=None, prefill_chunk=None, stats=stats, **kw)]
    return {"tokens": tokens, **stats}


def test_a_draft_that_agrees_is_accepted_and_one_that_does_not_falls_back_to_plain_steps():
    model = random_model()
    ids = torch.randint(3, 128, (1, 9))
    same = run(model, ids, 40, draft=copy.deepcopy(model), num_speculative=4)  # fixed k = 4
    assert same["accepted"] == same["proposed"] and same["steps"] <= 40 / 5 + 1
    other = run(model, ids, 60, draft=random_model(seed=1), num_speculative=None)  # adaptive
    assert other["accepted"] < other["proposed"] / 3
    # the schedule stops proposing: most steps are plain decode steps (one probe every PROBE_EVERY)
    assert other["proposed"] < 60 / 3


def test_a_run_of_rejections_reruns_at_most_max_unfed_tokens(monkeypatch):
    """After a rejection the accepted tokens go first in the next check; after a run of them, those tokens are run
    on their own first, so that a check never re-runs more than MAX_UNFED."""
    model = random_model()
    ids = torch.randint(3, 128, (1, 9))
    rerun, feed = [], speculative.Cursor.feed

    def noted(cursor, tokens, keep):
        if cursor.model is model and keep > 1:  # a check: the tokens before its proposals
            rerun.append(len(tokens) - (keep - 1))
        return feed(cursor, tokens, keep)

    monkeypatch.setattr(speculative.Cursor, "feed", noted)
    out = zamba2.generate(model, ids, 60, draft=random_model(seed=1), num_speculative=4)
    assert torch.equal(out, zamba2.generate(model, ids, 60))
    assert 2 < max(rerun) <= speculative.MAX_UNFED


def test_schedule_proposes_what_pays_and_probes_when_nothing_does():
    schedule = speculative.Schedule(k_max=6, adaptive=True)
    assert schedule.next(room=10) == 0  # a plain step first, to time it
    schedule.timed("plain", 1.0)
    assert schedule.next(room=10) == 6  # then a check, to time it (no more than the room)
    assert schedule.next(room=2) == 2
    schedule.timed("check", 1.2)
    schedule.timed("draft", 0.1)
    for _ in range(20):
        schedule.update(6, 6)  # all accepted: the longest k pays most
    assert schedule.next(room=10) == 6
    for _ in range(20):
        schedule.update(6, 0)  # none accepted: plain steps, and a probe of one token every PROBE_EVERY steps
    picks = [schedule.next(room=10) for _ in range(2 * speculative.PROBE_EVERY)]
    assert picks.count(1) == 2 and picks.count(0) == 2 * speculative.PROBE_EVERY - 2
    for _ in range(20):
        schedule.update(6, 6)  # and back: proposals again, with a plain step every PROBE_EVERY to re-time it
    picks = [schedule.next(room=10) for _ in range(2 * speculative.PROBE_EVERY)]
    assert picks.count(0) == 2 and picks.count(6) == 2 * speculative.PROBE_EVERY - 2
    assert speculative.Schedule(k_max=3, adaptive=False).next(room=10) == 3  # fixed


def test_eos_inside_accepted_proposals_ends_the_stream():
    model = random_model()
    ids = torch.randint(3, 128, (1, 9))
    plain = zamba2.generate(model, ids, 20)[0, 9:].tolist()
    eos = plain[6]
    first = plain.index(eos)
    out = zamba2.generate(model, ids, 20, eos_token_id=eos, draft=model, num_speculative=4)[0, 9:].tolist()
    assert out == plain[:first + 1]


def test_bad_arguments_are_user_errors():
    model = random_model()
    ids = torch.randint(3, 128, (1, 5))
    cases = [(dict(draft="lookup"), "prompt-lookup"), (dict(draft=3), "zamba2 model"),
             (dict(draft=random_model(zamba2.tiny(vocab_size=64))), "vocabulary"),
             (dict(draft="prompt-lookup", num_speculative=-1), "num_speculative")]
    for kw, words in cases:
        with pytest.raises(zamba2.errors.UserError, match=words):
            zamba2.generate(model, ids, 4, **kw)
    with pytest.raises(zamba2.errors.UserError, match="one sequence at a time"):
        zamba2.generate(model, ids.repeat(2, 1), 4, draft=model)
    assert zamba2.generate(model, ids, 0, draft=model).shape == (1, 5)


def joint_two_tokens(model, ids, temperature, top_k, top_p) -> torch.Tensor:
    """The model's exact distribution of its next two tokens after `ids` [1, t] -> [vocab, vocab]."""
    V = model.config.vocab_size
    with torch.no_grad():
        first = probabilities(model(ids)[:, -1], temperature, top_k, top_p)[0]  # [V]
        both = torch.cat([ids.repeat(V, 1), torch.arange(V)[:, None]], 1)
        second = probabilities(model(both)[:, -1], temperature, top_k, top_p)  # [V, V]
    return first[:, None] * second


def chi_square(counts: torch.Tensor, expected_p: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the cells expected to hold at least 5 (the rest pooled), and its degrees of freedom."""
    n = counts.sum()
    e, o = expected_p.flatten() * n, counts.flatten().float()
    big = e >= 5
    e = torch.cat([e[big], e[~big].sum()[None]])
    o = torch.cat([o[big], o[~big].sum()[None]])
    keep = e > 0
    return float(((o[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("drafter, temperature, top_k", [("model", 1.0, None), ("model", 0.7, 3),
                                                         ("prompt-lookup", 1.0, None)])
def test_sampling_is_distributed_as_the_model(drafter, temperature, top_k):
    """Two sampled tokens per run (the first through a proposal, accepted or resampled, the second from a proposal
    or the bonus token) over a 4-token vocabulary: their joint frequencies fit the model's exact joint distribution
    (chi-square within 5 standard deviations of its mean, deterministic seeds) and not the draft's."""
    model = random_model(zamba2.tiny(vocab_size=4))
    draft = random_model(zamba2.tiny(vocab_size=4), seed=1)
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])  # prompt lookup proposes "3 1"
    n = 500
    counts = torch.zeros(4, 4)
    for seed in range(n):
        out = zamba2.generate(model, ids, 2, temperature=temperature, top_k=top_k, seed=seed, num_speculative=2,
                              draft=draft if drafter == "model" else drafter)[0, -2:]
        counts[out[0], out[1]] += 1
    target = joint_two_tokens(model, ids, temperature, top_k, None)
    stat, df = chi_square(counts, target)
    assert stat < df + 5 * (2 * df) ** 0.5, (stat, df)
    wrong = joint_two_tokens(draft, ids, temperature, top_k, None) if drafter == "model" else \
        torch.eye(4)[3][:, None] * torch.eye(4)[1]  # what always accepting the lookup would give
    stat, df = chi_square(counts, 0.99 * wrong + 0.01 / 16)
    assert stat > df + 5 * (2 * df) ** 0.5, "the test cannot tell the draft from the model"


def test_check_keeps_the_rows_distribution_for_any_draft():
    """The acceptance rule alone, many draws, a draft far from the target: the first token follows p[0]."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 0.0, 3.0, 0.0, 0.0]])
    q = torch.tensor([[0.05, 0.05, 0.6, 0.2, 0.1]])
    counts = torch.zeros(5)
    for _ in range(2000):
        d = int(torch.multinomial(q[0], 1, generator=gen))
        j, token = speculative.check(logits, [d], q, 1.0, None, None, gen)
        counts[d if j else token] += 1
    stat, df = chi_square(counts, probabilities(logits[:1], 1.0)[0])
    assert stat < df + 5 * (2 * df) ** 0.5, stat
