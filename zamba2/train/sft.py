"""Chat fine-tuning data: JSONL conversations -> rendered, tokenized, loss-masked, packed training rows.

A conversation is rendered with the checkpoint's chat template (text/chat.py, as transformers renders
it), or BUILTIN_TEMPLATE when tokenizer_config.json has none. The loss covers exactly the assistant
turns: each turn's content plus the end-of-turn token that closes it. Spans are found by rendering the
conversation prefix by prefix: render(messages[:i], generation prompt) is the text the model is given
before turn i, and render(messages[:i+1]) minus that text is what it must produce.

Each span is tokenized on its own, the way `zamba2 serve` tokenizes a prompt and then generates: the
trained tokens are the tokens the model would emit after that prompt. Conversations are packed whole
into rows with doc_ids (document isolation, see Zamba2LM.forward); a conversation longer than a row is
truncated or dropped (`too_long`), and counted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..model.score import IGNORE
from ..text.chat import ChatTemplate, ChatTemplateError, chat_template
from ..text.read import parse_lines
from ..text.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


def parse_messages(line: str) -> list[dict] | None:
    """The messages of one JSONL line, or None when malformed (bad JSON, unknown role, non-string content)."""
    try:
        messages = json.loads(line)["messages"]
    except (json.JSONDecodeError, KeyError, TypeError, IndexError):
        return None
    if not isinstance(messages, list) or not messages:
        return None
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render_segments(template: ChatTemplate, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces; trained pieces are assistant content + end of turn."""
    eos = template.codec.eos_token
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        full = template.render(messages[:i + 1], add_generation_prompt=False)
        if not full.startswith(prompt) or not prompt.startswith(done):
            raise UserError("the chat template does not render conversations prefix by prefix; "
                             "cannot find the assistant turns")
        turn = full[len(prompt):]
        start = turn.find(m["content"])
        end = turn.find(eos, start + len(m["content"]))
        if start < 0 or end < 0:
            raise UserError(f"the chat template does not close assistant turns with the eos token {eos!r}")
        end += len(eos)
        pieces += [(prompt[len(done):] + turn[:start], False), (turn[start:end], True)]
        done = full[:len(prompt) + end]
    return [(text, trained) for text, trained in pieces if text]


def encode_conversation(template: ChatTemplate, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation (up to its last assistant turn) and which ones are trained."""
    ids, trained = [], []
    for text, is_trained in render_segments(template, messages):
        piece = template.codec.encode(text, add_bos=False)
        ids += piece
        trained += [is_trained] * len(piece)
    return ids, trained


def read_conversations(path: str | Path, template: ChatTemplate, max_len: int, too_long: str = "truncate",
                       stats: dict | None = None) -> list[tuple[list[int], list[bool]]]:
    """Encoded conversations of a chat JSONL file, at most max_len tokens each.

    Counted in `stats`: bad_lines (malformed JSON or messages), no_assistant (no assistant turn),
    truncated / dropped (longer than max_len, by `too_long`), conversations (kept).
    """
    if too_long not in ("truncate", "drop"):
        raise UserError(f"too_long must be 'truncate' or 'drop', not {too_long!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such chat data file: {path}")
    stats = stats if stats is not None else {}
    for k in ("bad_lines", "no_assistant", "truncated", "dropped", "conversations"):
        stats.setdefault(k, 0)
    out = []
    for messages in parse_lines(path, parse_messages, stats):  # malformed lines: None, counted in bad_lines
        if messages is None:
            continue
        if not any(m["role"] == "assistant" for m in messages):
            stats["no_assistant"] += 1
            continue
        try:
            ids, trained = encode_conversation(template, messages)
        except ChatTemplateError:  # the template's raise_exception (e.g. roles out of order)
            stats["bad_lines"] += 1
            continue
        if len(ids) > max_len:
            if too_long == "drop" or not any(trained[1:max_len]):
                stats["dropped"] += 1
                continue
            ids, trained = ids[:max_len], trained[:max_len]
            stats["truncated"] += 1
        out.append((ids, trained))
    stats["conversations"] = len(out)
    if not out:
        raise UserError(f"{path}: no usable conversations ({stats['bad_lines']} malformed lines, "
                         f"{stats['no_assistant']} without an assistant turn, {stats['dropped']} too long)")
    return out


def pack(conversations: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int) -> list[dict]:
    """Whole conversations packed in order into rows of seq_len: input_ids, labels, doc_ids (numpy, [seq_len])."""
    rows, cur = [], []
    for conv in conversations:
        if sum(len(c[0]) for c in cur) + len(conv[0]) > seq_len:
            rows.append(_row(cur, seq_len, pad_id))
            cur = []
        cur.append(conv)
    if cur:
        rows.append(_row(cur, seq_len, pad_id))
    return rows


def _row(convs, seq_len: int, pad_id: int) -> dict:
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    docs = np.full(seq_len, len(convs), dtype=np.int64)  # the padding tail is one more document
    at = 0
    for d, (tok, trained) in enumerate(convs):
        n = len(tok)
        ids[at:at + n], docs[at:at + n] = tok, d
        target = np.asarray(tok[1:], dtype=np.int64)
        labels[at:at + n - 1] = np.where(trained[1:], target, IGNORE)  # position t predicts token t+1
        at += n
    return {"input_ids": ids, "labels": labels, "doc_ids": docs}


class ChatLoader:
    """Batches of packed chat rows in a fixed (seeded) order, wrapping around; resumable like PackedLoader."""

    KEYS = ("input_ids", "labels", "doc_ids")

    def __init__(self, rows: list[dict], batch_size: int, vocab_size: int):
        if not rows:
            raise UserError("no rows to train on")
        self.rows, self.batch_size, self.vocab_size = rows, batch_size, vocab_size
        self.lo = self.pos = 0  # `lo`: where evaluate() restarts a validation pass

    def next_batch(self) -> dict[str, torch.Tensor]:
        picked = [self.rows[(self.pos + i) % len(self.rows)] for i in range(self.batch_size)]
        self.pos = (self.pos + self.batch_size) % len(self.rows)
        return {k: torch.from_numpy(np.stack([r[k] for r in picked])) for k in self.KEYS}

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def shuffle_split(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded shuffle, then the last `val_fraction` held out (nothing of a single item)."""
    order = np.random.default_rng(seed).permutation(len(items))
    items = [items[i] for i in order]
    n_val = round(val_fraction * len(items)) if len(items) > 1 else 0
    return items[:len(items) - n_val], items[len(items) - n_val:]


def chat_loaders(path: str | Path, model_folder: str | Path | None, tokenizer: Tokenizer, seq_len: int,
                 batch_size: int, val_fraction: float = 0.05, too_long: str = "truncate", seed: int = 0,
                 stats: dict | None = None) -> tuple[ChatLoader, ChatLoader | None]:
    """Train and validation loaders over a chat JSONL file; the last `val_fraction` of conversations (after a
    seeded shuffle) is held out."""
    template = chat_template(model_folder, tokenizer)
    train, val = shuffle_split(read_conversations(path, template, seq_len, too_long, stats), val_fraction, seed)
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    return (ChatLoader(pack(train, seq_len, pad), batch_size, tokenizer.vocab_size),
            ChatLoader(pack(val, seq_len, pad), batch_size, tokenizer.vocab_size) if val else None)
