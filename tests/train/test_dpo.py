"""DPO: pair reading and counting, the loss against the formula computed directly, and training that
raises the chosen-vs-rejected margin (full and LoRA) through `zamba2 dpo`."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zamba2
from zamba2.__main__ import main
from zamba2.train.dpo import DPOObjective, PairLoader, add_reference, read_pairs, sequence_logps

TINY = dict(vocab_size=32000, max_position_embeddings=512)


def pair(i: int) -> dict:
    a, b = i % 7, i % 5
    return {"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.",
            "rejected": "I do not know, sorry."}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    from conftest import random_model

    zamba2.save(random_model(**TINY), root / "base")
    lines = [json.dumps(pair(i)) for i in range(24)]
    lines.append(json.dumps({"prompt": [{"role": "user", "content": "Hi"}],  # chat form, shared prefix
                             "chosen": [{"role": "assistant", "content": "Hello!"}],
                             "rejected": [{"role": "assistant", "content": "Go away."}]}))
    lines += ["{broken", json.dumps({"prompt": "x", "chosen": "y"}),  # malformed: no rejected
              json.dumps({"chosen": [{"role": "user", "content": "a"}], "rejected": "b"}),  # no final assistant
              json.dumps({"prompt": "long " * 300, "chosen": "a", "rejected": "b"})]  # too long
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_pairs_are_read_and_bad_lines_counted(setup):
    stats = {}
    rows = read_pairs(setup / "pairs.jsonl", zamba2.load_tokenizer(), setup / "base", 96, stats)
    assert stats == {"bad_lines": 2, "no_assistant": 1, "dropped": 1, "pairs": 25}
    assert all(r["input_ids"].shape == (2, 96) for r in rows)
    # both sides share the prompt tokens and train only on the answer
    r = rows[0]
    first = [int(np.argmax(r["labels"][s] != -100)) for s in (0, 1)]
    assert first[0] == first[1] and (r["input_ids"][0, :first[0]] == r["input_ids"][1, :first[1]]).all()
    with pytest.raises(FileNotFoundError, match="no such preference data file"):
        read_pairs(setup / "nope.jsonl", zamba2.load_tokenizer(), None, 96)


def test_loss_equals_the_dpo_formula(setup):
    from conftest import random_model

    policy, reference = zamba2.load(setup / "base"), random_model(seed=5, **TINY)
    rows = read_pairs(setup / "pairs.jsonl", zamba2.load_tokenizer(), setup / "base", 96)[:3]
    add_reference(rows, reference, torch.float32)
    batch = PairLoader(rows, 3, 32000).next_batch()
    beta = 0.3
    got = DPOObjective(beta).loss(policy, batch, torch.float32) / 3

    def logp(model, ids, labels):  # token by token, from the full-sequence logits
        logits = model(torch.as_tensor(ids)[None])[0].log_softmax(-1)
        return sum(logits[t, labels[t]].item() for t in range(len(labels)) if labels[t] != -100)

    terms = []
    for r in rows:
        pi = [logp(policy, r["input_ids"][s], r["labels"][s]) for s in (0, 1)]
        ref = [logp(reference, r["input_ids"][s], r["labels"][s]) for s in (0, 1)]
        terms.append(-F.logsigmoid(torch.tensor(beta * ((pi[0] - ref[0]) - (pi[1] - ref[1])))))
    assert got.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-4)


def mean_margin(model_dir, setup, lora_dir=None) -> float:
    rows = read_pairs(setup / "pairs.jsonl", zamba2.load_tokenizer(), setup / "base", 96)
    add_reference(rows, zamba2.load(setup / "base"), torch.float32)
    model = zamba2.load(model_dir)
    batch = PairLoader(rows, len(rows), 32000).next_batch()
    with torch.no_grad():
        logps = sequence_logps(model, batch["input_ids"].flatten(0, 1), batch["labels"].flatten(0, 1), torch.float32)
    diff = logps.view(-1, 2) - batch["ref"].float()
    return (diff[:, 0] - diff[:, 1]).mean().item()


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_raises_the_chosen_vs_rejected_margin(setup, tmp_path, capsys, lora):
    args = ["dpo", "--model", str(setup / "base"), "--data", str(setup / "pairs.jsonl"), "--out", str(tmp_path),
            "--seq-len", "96", "--batch-size", "4", "--steps", "12", "--warmup-steps", "1", "--log-every", "1",
            "--eval-every", "6", "--save-every", "12", "--beta", "0.5", "--device", "cpu",
            "--lr", "1e-2" if lora else "2e-3"]
    if lora:
        args += ["--lora-rank", "4", "--merge"]
    assert main(args) == 0
    assert "skipped 2 malformed lines, 1 without a final assistant turn" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    margins = [r["reward_margin"] for r in records if "reward_margin" in r]
    assert len(margins) == 12 and margins[0] == pytest.approx(0, abs=1e-2)  # policy == reference at the start (LoRA: up to the bf16 base)
    assert margins[-1] > margins[0] and records[-1].get("reward_accuracy", 1) >= 0.5
    # the saved model prefers the chosen answers more than the starting model does
    assert mean_margin(tmp_path / ("merged" if lora else "checkpoint"), setup) > 0.5


def test_data_beyond_the_models_vocabulary_is_one_line(setup, tmp_path, capsys):
    """A preset with a smaller vocabulary than the tokenizer's: one line before the reference log-probs are scored
    (which would index past the embedding)."""
    assert main(["dpo", "--model", "tiny", "--data", str(setup / "pairs.jsonl"), "--out", str(tmp_path / "o"),
                 "--seq-len", "64", "--steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "zamba2 dpo: error: data vocabulary (32000) exceeds the model's (128)"
