"""Direct preference optimisation (Rafailov et al. 2023) on the fine-tuning Trainer.

    loss = -log sigmoid(beta * ((pi(chosen) - ref(chosen)) - (pi(rejected) - ref(rejected))))

pi and ref are the summed log-probabilities of the trained (assistant) tokens under the policy and under
the frozen starting model. The reference log-probs are computed once, before training, and stored with
the pairs, so no second model stays in memory (and a resumed run uses the same ones).

A pairs JSONL line is {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}:
a string prompt is one user turn, a string answer one assistant turn after the prompt, and message lists
are whole conversations ending in an assistant turn. Both sides are rendered with the chat template
(sft.py); assistant tokens they share cancel in the difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..model.score import IGNORE, token_logprobs
from ..text.chat import ChatTemplateError
from ..text.read import parse_lines
from ..text.tokenizer import Tokenizer, load_tokenizer
from .sft import ROLES, ChatLoader, chat_template, encode_conversation, shuffle_split


def _messages(value, prompt: list[dict]) -> list[dict] | None:
    if isinstance(value, str):
        return prompt + [{"role": "assistant", "content": value}]
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value):
        return prompt + [{"role": m["role"], "content": m["content"]} for m in value]
    return None


def parse_pair(line: str) -> tuple[list[dict], list[dict]] | None:
    """(chosen messages, rejected messages) of one JSONL line, or None when malformed."""
    try:
        d = json.loads(line)
        prompt = d.get("prompt", [])
    except (json.JSONDecodeError, AttributeError):
        return None
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, [])
    if prompt is None and d.get("prompt") not in (None, []):
        return None
    chosen, rejected = _messages(d.get("chosen"), prompt or []), _messages(d.get("rejected"), prompt or [])
    return None if chosen is None or rejected is None else (chosen, rejected)


def read_pairs(path: str | Path, tokenizer: Tokenizer, model_folder, max_len: int,
               stats: dict | None = None) -> list[dict]:
    """Pairs as rows {input_ids, labels: [2, max_len]} (chosen, rejected), right-padded.

    Counted in `stats`: bad_lines, no_assistant (a side not ending in an assistant turn), dropped (longer
    than max_len; truncating would score the two sides on different spans), pairs.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such preference data file: {path}")
    template = chat_template(model_folder, tokenizer)
    stats = stats if stats is not None else {}
    for k in ("bad_lines", "no_assistant", "dropped", "pairs"):
        stats.setdefault(k, 0)
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    rows = []
    for pair in parse_lines(path, parse_pair, stats):  # malformed lines: None, counted in bad_lines
        if pair is None:
            continue
        if any(side[-1]["role"] != "assistant" for side in pair):
            stats["no_assistant"] += 1
            continue
        try:
            sides = [encode_conversation(template, side) for side in pair]
        except ChatTemplateError:  # the template refused the conversation (e.g. roles out of order)
            stats["bad_lines"] += 1
            continue
        if any(len(ids) > max_len for ids, _ in sides):
            stats["dropped"] += 1
            continue
        ids = np.full((2, max_len), pad, dtype=np.int64)
        labels = np.full((2, max_len), IGNORE, dtype=np.int64)
        for s, (tok, trained) in enumerate(sides):
            ids[s, :len(tok)] = tok
            labels[s, :len(tok) - 1] = np.where(trained[1:], tok[1:], IGNORE)  # position t predicts t+1
        rows.append({"input_ids": ids, "labels": labels})
    stats["pairs"] = len(rows)
    if not rows:
        raise UserError(f"{path}: no usable pairs ({stats['bad_lines']} malformed lines, {stats['no_assistant']} "
                         f"without a final assistant turn, {stats['dropped']} too long)")
    return rows


def sequence_logps(model, input_ids: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Summed log-probability of the labelled tokens of each row: [n, L] -> [n]."""
    with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(input_ids)
    return token_logprobs(logits, labels).sum(-1)


@torch.no_grad()
def add_reference(rows: list[dict], reference, dtype: torch.dtype, batch_size: int = 8) -> None:
    """Store the reference model's log-probs of both sides in each row ("ref", [2])."""
    reference.eval()
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        ids = torch.from_numpy(np.concatenate([r["input_ids"] for r in part])).to(reference.device)
        labels = torch.from_numpy(np.concatenate([r["labels"] for r in part])).to(reference.device)
        ref = sequence_logps(reference, ids, labels, dtype).view(len(part), 2).cpu().numpy()
        for r, v in zip(part, ref):
            r["ref"] = v.astype(np.float64)


class PairLoader(ChatLoader):
    """Batches of pairs: input_ids/labels [b, 2, L] and ref [b, 2]. Rows stay pairs when ranks split a batch."""

    KEYS = ("input_ids", "labels", "ref")


class DPOObjective:
    """The Trainer's loss for preference pairs: summed DPO loss, counted per pair; logs reward statistics."""

    def __init__(self, beta: float):
        if beta <= 0:
            raise UserError(f"beta must be > 0, not {beta}")
        self.beta = beta
        self.margins: list[torch.Tensor] = []

    def count(self, batch: dict) -> int:
        return batch["input_ids"].shape[0]

    def loss(self, model, batch: dict, dtype: torch.dtype) -> torch.Tensor:
        b = batch["input_ids"].shape[0]
        logps = sequence_logps(model, batch["input_ids"].flatten(0, 1), batch["labels"].flatten(0, 1), dtype)
        rewards = self.beta * (logps.view(b, 2) - batch["ref"].to(logps))  # implicit rewards [b, (chosen, rejected)]
        margin = rewards[:, 0] - rewards[:, 1]
        if model.training:
            self.margins.append(margin.detach())
        return -F.logsigmoid(margin).sum()

    def metrics(self) -> dict:
        """Mean reward margin and accuracy (margin > 0) over the pairs trained since the last call."""
        if not self.margins:
            return {}
        m = torch.cat(self.margins)
        self.margins = []
        return {"reward_margin": m.mean().item(), "reward_accuracy": (m > 0).float().mean().item()}


def dpo(cfg, beta: float = 0.1, lora=None, merge: bool = False, resume: bool = False) -> dict:
    """DPO on the pairs JSONL `cfg.data` from `cfg.model` (TrainConfig; seq_len is the longest pair side).

    Output as `finetune`: OUT/checkpoint, or with LoRA OUT/adapter or OUT/merged. Returns the data counts."""
    from .finetune import finetune
    from .trainer import build_model, check_vocabulary, compute_dtype, start_folder

    folder = start_folder(cfg.model)  # None for a preset
    stats: dict = {}
    tokenizer = load_tokenizer(folder)
    rows = read_pairs(cfg.data, tokenizer, folder, cfg.seq_len, stats)
    model = build_model(cfg)  # the starting model: first the frozen reference, then (same weights) the policy
    check_vocabulary(model, tokenizer.vocab_size)
    add_reference(rows, model, compute_dtype(cfg.dtype, model.device))
    train, val = shuffle_split(rows, cfg.val_fraction, cfg.seed)
    loaders = (PairLoader(train, cfg.batch_size, tokenizer.vocab_size),
               PairLoader(val, cfg.batch_size, tokenizer.vocab_size) if val else None)
    return finetune(cfg, lora, merge, resume, loaders=loaders, objective=DPOObjective(beta), stats=stats,
                    model=None if resume else model)
