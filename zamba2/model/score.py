"""Log-probabilities of given tokens under a model's logits: the one scorer behind the LM loss and DPO
(train/), perplexity and lm-eval's loglikelihoods (eval/) and the server's prompt logprobs (serve/).

It sits beside the model rather than in eval/ because training is a lower layer than evaluation (eval/
may import train/, never the reverse) and both need it; it needs nothing but torch. It is
`F.cross_entropy(reduction="none")`, so training keeps the fused kernel (backward: softmax minus
one-hot, no [tokens, vocab] gather buffer) and scoring gets exactly -log_softmax(logits)[target].
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # the target of a position that is not scored (padding, prompt, a document boundary)


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(targets[..., t]) under logits[..., t, :], in float32, shaped like targets; IGNORE targets score 0."""
    nll = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return -nll.view(targets.shape)
