"""`zamba2 chat` (infer/chat.py): a conversation continued on its carried cache is the conversation prefilled at
once."""

import io
import json
import subprocess
import sys

import pytest
import torch

import zamba2
from conftest import random_model
from zamba2.infer.chat import ChatSession, ContextFull, chat
from zamba2.text.chat import ChatTemplate, TextCodec, chat_template, save_tokenizer

TURNS = ["Hello there", "What is a for statement?", "And a while loop?", "Thanks"]


@pytest.fixture(scope="module")
def model():
    return random_model(zamba2.tiny(vocab_size=32000, max_position_embeddings=256))  # the Mistral vocabulary


@pytest.fixture(scope="module")
def tok():
    return zamba2.load_tokenizer()


def checked_conversation(model, session, turns):
    """Run `turns`, checking after each that the reply is what greedy generation gives for the whole conversation
    so far prefilled at once, and that the cache holds exactly the conversation's tokens. Returns why each ended."""
    stops = []
    for text in turns:
        "".join(session.say(text))
        reply = session.reply
        prompt = session.ids[:len(session.ids) - len(reply)]
        expected = zamba2.generate(model, [prompt], len(reply), eos_token_id=session.eos)[0, len(prompt):]
        assert reply == expected.tolist()
        assert session.cache.length == len(session.ids)
        stops.append(session.stop)
    return stops


def test_a_carried_conversation_equals_prefilling_it_at_once(model, tok):
    probe = ChatSession(model, tok, chat_template(None, tok), max_new_tokens=6)
    first_prompt = probe.template.codec.encode(probe.template.render([{"role": "user", "content": TURNS[0]}]), False)
    assert set(checked_conversation(model, probe, TURNS)) == {"length"} and probe.reprefills == 0
    model = random_model(model.config)
    with torch.no_grad():  # the model says eos where it said its third token: turns end at eos and at the limit
        w, said = (model.lm_head or model.embed_tokens).weight, probe.ids[len(first_prompt) + 2]  # tied in tiny()
        w[[tok.eos_id, said]] = w[[said, tok.eos_id]]
    session = ChatSession(model, tok, chat_template(None, tok), system="Be brief.", max_new_tokens=6)
    stops = checked_conversation(model, session, TURNS)
    assert "eos" in stops
    assert session.reprefills == 0 and session.messages[0] == {"role": "system", "content": "Be brief."}
    assert len(session.messages) == 1 + 2 * len(TURNS)
    first = session.template.codec.encode(session.template.render(session.messages[:2]), add_bos=False)
    assert session.ids[:len(first)] == first  # turn 1's prompt, exactly as rendered


def test_a_template_that_rewrites_history_falls_back_to_prefilling_it_all(model, tok):
    counting = "{{ messages|length }}" + chat_template(None, tok).source  # the first line changes every turn
    template = ChatTemplate({"chat_template": counting}, TextCodec(tok, {}))
    session = ChatSession(model, tok, template, max_new_tokens=4)
    checked_conversation(model, session, TURNS[:3])
    assert session.reprefills == 2


def test_commands_reset_system_and_save(model, tok, tmp_path):
    session = ChatSession(model, tok, chat_template(None, tok), max_new_tokens=3)
    out = io.StringIO()
    chat(session, ["Hi", "/save " + str(tmp_path / "a.json"), "/reset", "/system You are terse.", "Hi again",
                   "/nope", "/exit", "never read"], out)
    saved = json.loads((tmp_path / "a.json").read_text())["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant"] and saved[0]["content"] == "Hi"
    assert [m["content"] for m in session.messages[:2]] == ["You are terse.", "Hi again"]
    assert len(session.messages) == 3 and session.cache.length == len(session.ids)
    assert "(conversation reset)" in out.getvalue() and "(system prompt set" in out.getvalue()


def test_a_full_context_is_said_and_reset_offered(model, tok, capsys):
    session = ChatSession(model, tok, chat_template(None, tok), max_new_tokens=50, max_context=24)
    out = io.StringIO()
    chat(session, ["Hello", "Hello again"], out)
    assert session.stop == "context" and session.cache.length == 24
    assert "(the context is full: 24 tokens; /reset starts a new conversation)" in out.getvalue()
    assert "would fill the context (24 tokens); /reset starts a new one" in capsys.readouterr().err
    with pytest.raises(ContextFull):
        "".join(session.say("more"))
    assert session.cache.length == 24 and len(session.messages) == 2  # the refused turn left no trace


def test_a_stopped_reply_drops_its_turn(model, tok):
    session = ChatSession(model, tok, chat_template(None, tok), max_new_tokens=5)
    "".join(session.say("Hi"))
    length, ids = session.cache.length, list(session.ids)
    reply = session.say("Tell me more")
    next(reply)
    reply.close()
    assert session.cache.length == length and session.ids == ids and len(session.messages) == 2
    checked_conversation(model, session, ["Tell me more"])


def test_the_command_line_chats_over_piped_stdin(model, tok, tmp_path):
    folder = tmp_path / "ckpt"
    zamba2.save(model, folder)
    save_tokenizer(tok, folder)
    out = subprocess.run([sys.executable, "-m", "zamba2", "chat", "--model", str(folder), "--max-new-tokens", "4",
                          "--system", "Be brief."], input="Hello\n/save " + str(tmp_path / "c.json") + "\nBye\n",
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 3 and "(saved to" in out.stdout
    session = ChatSession(model, tok, chat_template(folder, tok), "Be brief.", max_new_tokens=4)
    assert out.stdout.splitlines()[0] == "".join(session.say("Hello"))
    assert [m["role"] for m in json.loads((tmp_path / "c.json").read_text())["messages"]] == [
        "system", "user", "assistant"]


@pytest.mark.parametrize("draft", ["model", "prompt-lookup"])
def test_a_speculative_conversation_gives_the_plain_conversations_tokens(model, tok, draft):
    """The drafter carried from turn to turn (a draft model's own cache, prompt lookup's index over the whole
    conversation), including a dropped turn and a template that rewrites history, gives exactly the tokens of the
    same chat without it; the cache holds the conversation."""
    drafter = random_model(model.config, seed=1) if draft == "model" else draft
    turns = TURNS + ["Hello there", "Hello there"]  # a repeated turn: prompt lookup finds its earlier reply
    plain = ChatSession(model, tok, chat_template(None, tok), system="Be brief.", max_new_tokens=8)
    fast = ChatSession(model, tok, chat_template(None, tok), system="Be brief.", max_new_tokens=8, draft=drafter,
                       num_speculative=3)
    for text in turns:
        "".join(plain.say(text))
        "".join(fast.say(text))
        assert fast.reply == plain.reply and fast.ids == plain.ids and fast.cache.length == len(fast.ids)
        assert fast.speculator.text == fast.ids
    assert fast.speculator.stats["proposed"] > 0
    if draft == "prompt-lookup":
        assert fast.speculator.stats["accepted"] > 0
    reply = fast.say("Tell me more")  # stopped: the turn is dropped, the drafter starts again on the rest
    next(reply)
    reply.close()
    assert fast.speculator.text == fast.ids and fast.cache.length == len(fast.ids)
    checked_conversation(model, fast, ["Tell me more"])
    assert fast.speculator.text == fast.ids


def test_a_speculative_conversation_with_a_rewriting_template(model, tok):
    counting = "{{ messages|length }}" + chat_template(None, tok).source
    template = ChatTemplate({"chat_template": counting}, TextCodec(tok, {}))
    session = ChatSession(model, tok, template, max_new_tokens=4, draft="prompt-lookup")
    checked_conversation(model, session, TURNS[:3])
    assert session.reprefills == 2 and session.speculator.text == session.ids


def test_the_command_line_chats_speculatively(model, tok, tmp_path):
    folder = tmp_path / "ckpt"
    zamba2.save(model, folder)
    save_tokenizer(tok, folder)
    lines = "Hello\nHello\nBye\n"
    outs = []
    for flags in ([], ["--draft", str(folder), "--draft-int8"], ["--prompt-lookup", "--num-speculative", "2"]):
        out = subprocess.run([sys.executable, "-m", "zamba2", "chat", "--model", str(folder), "--max-new-tokens", "6",
                              *flags], input=lines, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        outs.append(out.stdout)
    assert outs[0].count("\n") == 3 and outs[1] == outs[0] and outs[2] == outs[0]
    out = subprocess.run([sys.executable, "-m", "zamba2", "chat", "--model", str(folder), "--num-speculative", "2"],
                         input="Hi\n", capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "--num-speculative goes with --draft MODEL or --prompt-lookup" in out.stderr
