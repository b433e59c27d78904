"""The lm-evaluation-harness model `zamba2`: loglikelihood, loglikelihood_rolling and generate_until on the
model itself (no HTTP). Importing this module registers it:

    import lm_eval, zamba2.eval.harness
    lm_eval.simple_evaluate(model="zamba2", model_args="pretrained=PATH", tasks=[...])

`zamba2 eval lm-eval` does exactly that. Tokenization follows lm-eval's HF model and its
`local-completions` client: no BOS before a context (add_bos_token=True to change that), BOS as the
prefix of an empty context and of every rolling window, so the three give the same loglikelihoods.
"""

from __future__ import annotations

from pathlib import Path

# lm-eval registers its built-in models ("hf", "local-completions", ...) lazily, only while its registry is
# empty: import them before registering ours, or they become unreachable in this process.
import lm_eval.models  # noqa: F401
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..errors import UserError
from ..infer.generate import stream
from ..infer.load import load_for_inference
from ..model.score import token_logprobs


@register_model("zamba2")
class Zamba2Harness(TemplateLM):
    def __init__(self, pretrained: str, dtype: str = "float32", device: str | None = "cpu", batch_size: int | str = 1,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool = False,
                 revision: str | None = None, **unused):
        super().__init__()
        if dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
        device = device or "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's command line asks for cuda by default; its HF model falls back the same way
        self.model, self.tok = load_for_inference(pretrained, dtype, device, revision=revision)
        cfg = self.model.config
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)  # no memory probing
        self.max_length = int(max_length or cfg.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = str(add_bos_token).lower() in ("true", "1")
        self.pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **unused) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tok.encode(string, add_bos=bos)

    def tok_decode(self, tokens: list[int], **unused) -> str:
        return self.tok.decode(tokens)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **unused) -> list[tuple[float, bool]]:
        """requests: (cache key, context ids, continuation ids) -> (sum of continuation logprobs, is greedy).

        Rows are batched longest first and left-padded (a padded row computes exactly what it does alone);
        inputs longer than max_length keep their last max_length tokens, as lm-eval's HF model does.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for b in range(0, len(order), self.batch_size):
            batch = order[b:b + self.batch_size]
            inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in batch]
            conts = [requests[i][2] for i in batch]
            t = max(map(len, inputs))
            ids = torch.tensor([[self.pad] * (t - len(x)) + x for x in inputs], device=self.model.device)  # [b, t]
            mask = torch.tensor([[0] * (t - len(x)) + [1] * len(x) for x in inputs], device=self.model.device)
            keep = max(map(len, conts))
            logits = self.model(ids, attention_mask=mask, logits_to_keep=keep)  # [b, keep, V]
            for row, (i, cont) in enumerate(zip(batch, conts)):
                rows = logits[row, keep - len(cont):]  # [len(cont), vocab]: the rows predicting the continuation
                target = torch.tensor(cont, device=rows.device)
                answer = (float(token_logprobs(rows, target).sum()), bool((rows.argmax(-1) == target).all()))
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document loglikelihood: windows of max_length tokens, each token scored once."""
        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            total = sum(lp for lp, _ in self._loglikelihood_tokens([(None, c, x) for c, x in windows]))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", True) else 0.0
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new):] or [self.prefix_token_id]
            push = self.tok.stream_decoder()
            for t in ids[-8:]:  # context so that the first word's leading space decodes right
                push(t)
            text = ""
            for token in stream(self.model, torch.tensor([ids]), max_new, temperature=temperature,
                                top_p=kwargs.get("top_p"), top_k=kwargs.get("top_k"),
                                eos_token_id=self.model.config.eos_token_ids, seed=kwargs.get("seed")):
                if int(token[0]) in self.model.config.eos_token_ids:
                    break
                text += push(int(token[0]))
                if any(s in text for s in until):
                    break
            cut = min((text.find(s) for s in until if s in text), default=len(text))
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text[:cut])
            out.append(text[:cut])
        return out


TASKS_DIR = Path(__file__).parent / "tasks"


def evaluate(model_path: str, tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
             limit: int | None = None, batch_size: int = 1, dtype: str = "float32", device: str = "cpu",
             max_length: int | None = None, revision: str | None = None) -> dict:
    """lm_eval.simple_evaluate on the `zamba2` model, with the bundled offline tasks (tasks/) on the task path."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([include_path] if include_path else [])
    manager = TaskManager(include_path=paths, include_defaults=False)  # indexing lm-eval's own tasks takes seconds
    if any(not manager.match_tasks([t]) for t in tasks):
        manager = TaskManager(include_path=paths)
    missing = [t for t in tasks if not manager.match_tasks([t])]
    if missing:
        raise UserError(f"unknown task(s) {missing}; the bundled offline tasks are "
                         f"{sorted(p.stem for p in TASKS_DIR.glob('*.yaml'))}")
    model_args = {"pretrained": model_path, "dtype": dtype}  # device and batch_size travel separately
    if max_length:
        model_args["max_length"] = max_length
    if revision:
        model_args["revision"] = revision
    return simple_evaluate(model="zamba2", model_args=model_args, tasks=tasks, task_manager=manager,
                           num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device)


if __name__ == "__main__":  # lm-eval's own command line, with the `zamba2` model registered (lm_eval alone cannot find it)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
