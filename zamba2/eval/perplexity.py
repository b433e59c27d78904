"""Token-level perplexity of documents under a sliding window, every token scored exactly once.

A document (BOS + its tokens) is read in windows of `window` tokens that advance by `stride`. Each
window scores only the tokens no earlier window scored: its last `stride` tokens (all of the first
window's), so every token after the first window is predicted from at least `window - stride` tokens of
context. stride = window - 1 is the cheapest; a smaller stride gives more context per token and costs
more forwards. A document that fits in one window is one forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..errors import UserError
from ..model.score import token_logprobs
from ..model.zamba2 import Zamba2LM
from ..text.tokenizer import Tokenizer


@torch.inference_mode()
def document_nll(model: Zamba2LM, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """(sum of -log p(token | context), number of tokens scored) over ids[1:]; ids[0] (BOS) is context only."""
    if not 1 <= stride < window:
        raise UserError(f"need 1 <= stride < window, got stride {stride} and window {window}")
    total, scored, start = 0.0, 1, 0
    while scored < len(ids):
        end = min(start + window, len(ids))
        new = end - scored  # the tokens of ids[start:end] that no earlier window scored
        chunk = torch.tensor([ids[start:end]], device=model.device)  # [1, w]
        logits = model(chunk, logits_to_keep=new + 1)[0, :-1]  # [new, vocab]; row j predicts the j-th new token
        targets = chunk[0, -new:]  # [new]
        total -= float(token_logprobs(logits, targets).sum())
        scored, start = end, start + stride
    return total, len(ids) - 1


def perplexity(model: Zamba2LM, tokenizer: Tokenizer, texts: Iterable[str], window: int | None = None,
               stride: int | None = None) -> dict:
    """Perplexity over documents scored separately (each with BOS); window defaults to the context length."""
    window = window or model.config.max_position_embeddings
    stride = stride or window // 2
    nll, tokens, docs = 0.0, 0, 0
    for text in texts:
        ids = tokenizer.encode(text, add_bos=True)
        if len(ids) < 2:
            continue
        doc_nll, n = document_nll(model, ids, window, stride)
        nll, tokens, docs = nll + doc_nll, tokens + n, docs + 1
    if not tokens:
        raise UserError("no tokens to score: the data holds no non-empty documents")
    return {"documents": docs, "tokens": tokens, "nll_per_token": nll / tokens, "perplexity": math.exp(nll / tokens),
            "window": window, "stride": stride}
