"""Chat SFT: rendering, the assistant-only loss mask, packing, bad input, and `zamba2 finetune` end to end."""

import json

import pytest
import torch

import zamba2
from zamba2.__main__ import build_parser, finetune_config, main
from zamba2.model.score import IGNORE
from zamba2.text.chat import BUILTIN_TEMPLATE, chat_template
from zamba2.train.sft import chat_loaders, encode_conversation, pack, read_conversations, render_segments
from zamba2.train.trainer import Trainer

TINY = dict(vocab_size=32000, max_position_embeddings=512)
# a ChatML-like template whose turns continue after the end-of-turn token (a newline), with a system prompt
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + eos_token + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "Six, of course."}]


def conversation(i: int) -> dict:
    a, b = i % 7, i % 5
    return {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                         {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}


@pytest.fixture(params=["builtin", "chatml"])
def template(request, tmp_path):
    if request.param == "chatml":
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "</s>"}))
    return chat_template(tmp_path, zamba2.load_tokenizer())


def test_mask_is_exactly_the_assistant_content_and_end_of_turn(template):
    ids, trained = encode_conversation(template, CONV)
    codec = template.codec
    # the pieces put back together are the rendered conversation, up to the last end of turn
    full = template.render(CONV, add_generation_prompt=False)
    text = "".join(t for t, _ in render_segments(template, CONV))
    assert full.startswith(text) and text.endswith("Six, of course.</s>")
    # trained runs of tokens: one per assistant turn, each exactly its content + </s>
    runs, cur = [], []
    for i, t in zip(ids, trained):
        if t:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs.append(cur)
    assert runs == [codec.encode("It is 4.</s>", add_bos=False), codec.encode("Six, of course.</s>", add_bos=False)]
    assert runs[0][-1] == codec.tok.eos_id
    # the untrained tokens are the prompt the model is served before each turn
    prompt = template.render(CONV[:2], add_generation_prompt=True)
    assert ids[:trained.index(True)] == codec.encode(prompt, add_bos=False)


def test_packed_rows_train_on_assistant_tokens_only(template):
    convs = [encode_conversation(template, conversation(i)["messages"]) for i in range(6)]
    rows = pack(convs, seq_len=128, pad_id=2)
    assert sum(len(c[0]) for c in convs) <= 128 * len(rows) and len(rows) < len(convs)
    row, (ids, trained) = rows[0], convs[0]
    n = len(ids)
    assert list(row["input_ids"][:n]) == ids and set(row["doc_ids"][:n]) == {0} and row["doc_ids"][n] == 1
    expected = [t if m else IGNORE for t, m in zip(ids[1:], trained[1:])] + [IGNORE]  # no target across documents
    assert list(row["labels"][:n]) == expected
    assert all(row["doc_ids"][1:] >= row["doc_ids"][:-1])  # nondecreasing, as Zamba2LM.forward requires


def test_bad_lines_missing_assistants_and_long_conversations_are_counted(tmp_path):
    template = chat_template(None, zamba2.load_tokenizer())
    long = {"messages": [{"role": "user", "content": "hi " * 200}, {"role": "assistant", "content": "ok"}]}
    lines = [json.dumps(conversation(i)) for i in range(3)] + [
        "{not json", json.dumps({"text": "no messages"}), json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "alone"}]}), json.dumps(long),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a " * 200}]})]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n\n")
    stats = {}
    convs = read_conversations(tmp_path / "chat.jsonl", template, 64, "truncate", stats)
    assert stats == {"bad_lines": 3, "no_assistant": 1, "truncated": 1, "dropped": 1, "conversations": 4}
    assert all(len(ids) <= 64 for ids, _ in convs)
    stats = {}
    read_conversations(tmp_path / "chat.jsonl", template, 64, "drop", stats)
    assert stats["dropped"] == 2 and stats["conversations"] == 3
    (tmp_path / "none.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="no usable conversations.*1 without an assistant turn"):
        read_conversations(tmp_path / "none.jsonl", template, 64)
    with pytest.raises(FileNotFoundError, match="no such chat data file"):
        read_conversations(tmp_path / "missing.jsonl", template, 64)


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    from conftest import random_model

    zamba2.save(random_model(**TINY), root / "base")
    (root / "chat.jsonl").write_text("\n".join(json.dumps(conversation(i)) for i in range(40)) + "\n{bad\n")
    return root


def test_finetune_cli_lowers_the_loss_resumes_and_writes_a_chat_checkpoint(chat_setup, tmp_path, capsys):
    args = ["finetune", "--model", str(chat_setup / "base"), "--data", str(chat_setup / "chat.jsonl"),
            "--seq-len", "64", "--batch-size", "2", "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "4",
            "--save-every", "3", "--log-every", "1", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "a"), "--steps", "6"]) == 0
    assert "skipped 1 malformed lines, 0 without an assistant turn" in capsys.readouterr().out
    losses = [json.loads(line)["loss"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # the same run interrupted after the step-3 checkpoint, then resumed: the same losses
    cfg, _ = finetune_config(build_parser().parse_args(args + ["--out", str(tmp_path / "b"), "--steps", "6"]))
    loaders = lambda: chat_loaders(cfg.data, cfg.model, zamba2.load_tokenizer(), 64, 2, cfg.val_fraction)
    first = Trainer(cfg, loaders=loaders()).run(stop_after=4)
    resumed = Trainer(cfg, resume=True, loaders=loaders())
    assert resumed.step == 3 and first[:3] + resumed.run() == pytest.approx(losses, rel=1e-6)
    out = tmp_path / "a" / "checkpoint"
    assert zamba2.load(out).config.vocab_size == 32000
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == BUILTIN_TEMPLATE


def test_finetune_cli_names_bad_input(chat_setup, tmp_path, capsys):
    base = ["finetune", "--model", str(chat_setup / "base"), "--out", str(tmp_path)]
    assert main(base + ["--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such chat data file" in capsys.readouterr().err
    assert main(base + ["--data", str(chat_setup / "chat.jsonl"), "--merge"]) == 2
    assert "--merge needs LoRA" in capsys.readouterr().err
    assert main(base + ["--data", str(chat_setup / "chat.jsonl"), "--merge", "--lora-rank", "2",
                        "--lora-shared", "per-visit"]) == 2
    assert "cannot merge a per-visit LoRA on down_proj" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before training


def test_lora_finetune_merges_resumes_and_leaves_the_base_alone(chat_setup, tmp_path):
    args = ["finetune", "--model", str(chat_setup / "base"), "--data", str(chat_setup / "chat.jsonl"),
            "--seq-len", "64", "--batch-size", "2", "--lr", "1e-2", "--warmup-steps", "1", "--save-every", "3",
            "--log-every", "1", "--device", "cpu", "--lora-rank", "2", "--lora-shared", "per-visit",
            "--lora-targets", "in_proj", "q_proj", "gate_up_proj", "--steps", "6"]
    assert main(args + ["--out", str(tmp_path / "a"), "--merge"]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]
    base, merged = zamba2.load(chat_setup / "base"), zamba2.load(tmp_path / "a" / "merged")
    assert merged.config.adapter_rank == base.config.adapter_rank + 2
    saved_base = zamba2.load(tmp_path / "a" / "checkpoint").state_dict()  # the frozen base, held in bfloat16
    assert all(torch.equal(v, base.state_dict()[k].bfloat16().float()) for k, v in saved_base.items())
    # interrupted after the step-3 checkpoint (base in the HF files, adapters in train_state.pt), then resumed
    cfg, lora = finetune_config(build_parser().parse_args(args + ["--out", str(tmp_path / "b")]))
    loaders = lambda: chat_loaders(cfg.data, cfg.model, zamba2.load_tokenizer(), 64, 2, cfg.val_fraction)
    first = Trainer(cfg, loaders=loaders(), lora=lora).run(stop_after=4)
    resumed = Trainer(cfg, resume=True, loaders=loaders(), lora=lora)
    assert resumed.step == 3 and first[:3] + resumed.run() == pytest.approx(losses, rel=1e-6)
