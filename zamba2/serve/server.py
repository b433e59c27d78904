"""The server adaptor between HTTP requests and the batching `Engine`.

`Server` holds the model, the chat template and the sampling defaults of a checkpoint; it validates
prompts against the context, turns a request into one engine request per choice (prompts x n), feeds
the engine's events (through an asyncio queue) to the `Choice`s, cancels them however a request ends,
and formats logprobs in OpenAI's two shapes. Every problem is an `APIError` (protocol.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import read_json
from ..model.zamba2 import Zamba2LM
from ..text.chat import ChatTemplate, ChatTemplateError, TextCodec, read_tokenizer_config
from ..text.tokenizer import Tokenizer
from .choice import Choice
from .engine import Engine, Event, QueueFull
from .engine import Request as EngineRequest
from .metrics import Metrics
from .protocol import APIError


@dataclass
class Limits:
    max_batch: int = 16  # rows decoded together
    max_queue: int = 256  # engine requests waiting for a row; more gets 503
    max_n: int = 16  # choices per prompt
    max_prompts: int = 64  # prompts per /v1/completions call
    max_body_bytes: int = 8 * 2**20  # larger request bodies get 413 (a 32k-token prompt is about 150 KB of text)
    prefix_cache_mb: int = 1024  # snapshots of finished requests' states kept for reuse (0: off)
    prefill_chunk: int = 256  # prompt tokens prefilled per engine iteration while other rows decode


class Server:
    def __init__(self, model: Zamba2LM, tokenizer: Tokenizer, folder: str | Path | None, name: str,
                 limits: Limits | None = None, draft=None, num_speculative: int | None = None):
        """`draft`, `num_speculative`: speculative decoding for a request alone in the batch (engine.py)."""
        self.model, self.name, self.limits = model, name, limits or Limits()
        self.context = model.config.max_position_embeddings
        config = read_tokenizer_config(folder)
        self.codec = TextCodec(tokenizer, config)
        self.template = ChatTemplate(config, self.codec)
        self.eos = model.config.eos_token_ids
        self.defaults = _generation_defaults(folder)
        self.metrics = Metrics()
        self.engine = Engine(model, self.limits.max_batch, self.limits.max_queue, self.metrics,
                             self.limits.prefix_cache_mb * 2**20, self.limits.prefill_chunk, draft, num_speculative)
        self.created = int(time.time())
        self.draining = False  # set on SIGTERM (app.serve): new requests get 503
        self.in_flight = 0  # HTTP requests inside a route (middleware.Gate counts them)

    # --- requests -> engine requests --------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise APIError(f"the model `{name}` does not exist; this server serves `{self.name}`", 404,
                           "model", "not_found_error")

    def check_prompt(self, ids: list[int], max_tokens: int | None) -> int:
        """Validate a prompt's ids and length; returns max_tokens (None: up to the context length)."""
        if not ids:
            raise APIError("the prompt is empty", param="prompt")
        vocab = self.model.config.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise APIError(f"token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
        if max_tokens is None:
            max_tokens = max(self.context - len(ids), 0)
        if len(ids) + max_tokens > self.context:
            raise APIError(f"this model's maximum context length is {self.context} tokens, but {len(ids) + max_tokens} "
                           f"were requested ({len(ids)} in the prompt, {max_tokens} to generate)", param="max_tokens")
        return max_tokens

    def chat_prompt(self, messages: list, add_generation_prompt: bool, kwargs: dict | None = None) -> list[int]:
        """The token ids of a conversation rendered with the chat template."""
        try:
            text = self.template.render([m.template_dict() for m in messages], add_generation_prompt, kwargs)
        except ChatTemplateError as e:
            hint = "" if self.template.source else "; use /v1/completions with a formatted prompt"
            raise APIError(f"{e}{hint}") from None
        return self.codec.encode(text, add_bos=False)  # the template writes its own BOS

    def submit(self, choices: list[Choice], body, max_tokens: list[int], logprobs: int | None, echo: bool,
              queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        temperature = _pick(body.temperature, self.defaults.get("temperature"), 1.0)
        top_p = _pick(body.top_p, self.defaults.get("top_p"), 1.0)
        top_k = _pick(body.top_k, self.defaults.get("top_k"), 0)
        requests = []
        for c, m in zip(choices, max_tokens):
            def emit(event: Event, i=c.index):  # engine thread -> this request's event loop
                loop.call_soon_threadsafe(queue.put_nowait, (i, event))

            seed = None if body.seed is None else body.seed + c.index  # n seeded choices must differ
            c.request = EngineRequest(c.prompt, m, emit, temperature=temperature, top_k=top_k if top_k > 0 else None,
                                      top_p=top_p, seed=seed, eos=[] if body.ignore_eos else self.eos,
                                      logprobs=logprobs, echo_logprobs=echo and logprobs is not None,
                                      speculative=body.speculative)
            requests.append(c.request)
        if len(requests) > self.engine.max_queue:  # 503 would tell the client to retry, which can never succeed
            raise APIError(f"this request needs {len(requests)} sequences (prompts x n) but the server queues at most "
                           f"{self.engine.max_queue} (--max-queue); send fewer prompts or a smaller n", param="n")
        try:
            self.engine.submit(*requests)
        except QueueFull as e:
            raise APIError(str(e), 503, kind="server_overloaded") from None

    def cancel(self, choices: list[Choice]) -> None:
        for c in choices:
            if c.request is not None and not c.request.cancelled:
                self.engine.cancel(c.request)

    async def run(self, choices: list[Choice], queue: asyncio.Queue):
        """Feed engine events to the choices; yields each time a choice changed, until all are finished."""
        try:
            while any(c.finish is None for c in choices):
                index, event = await queue.get()
                choice = choices[index]
                choice.feed(event)
                if choice.finish is not None:
                    self.engine.cancel(choice.request)  # a no-op when the engine finished it; frees it on a stop string
                yield choice
        finally:  # also on client disconnect (the streaming task is cancelled) and on errors
            self.cancel(choices)

    async def complete(self, choices: list[Choice], queue: asyncio.Queue) -> None:
        """Wait until every choice has finished (a non-streaming response); an engine error is a 500."""
        async for c in self.run(choices, queue):
            if c.error:
                self.cancel(choices)
                raise APIError(c.error, 500, kind="server_error")

    # --- responses ---------------------------------------------------------------------------------

    def completion_logprobs(self, tokens: list[int], entries: list, offset: int = 0) -> dict:
        """OpenAI's legacy logprobs object for `tokens`; entries[i] is None or (logprob, top) for tokens[i].

        text_offset counts the token strings as shown in `tokens` (SentencePiece's word marker as a space)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, e in zip(tokens, entries):
            text = self.codec.token_text(t)
            out["tokens"].append(text)
            out["token_logprobs"].append(None if e is None else e[0])
            out["top_logprobs"].append(None if e is None else {self.codec.token_text(i): v for i, v in e[1]})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def chat_logprobs(self, entries: list, k: int) -> dict:
        def item(token: int, logprob: float) -> dict:
            text = self.codec.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top[:k]]}
                            for t, lp, top in entries]}


def _pick(value, default, fallback):
    return value if value is not None else default if default is not None else fallback


def _generation_defaults(folder) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json, applied to fields a request leaves unset."""
    path = Path(folder) / "generation_config.json" if folder is not None else None
    if path is None or not path.exists():
        return {}
    cfg = read_json(path)
    if cfg.get("do_sample") is False:
        return {"temperature": 0.0}
    return {k: cfg[k] for k in ("temperature", "top_p", "top_k") if isinstance(cfg.get(k), (int, float))}


def encode_prompts(prompt, codec: TextCodec) -> tuple[list[list[int]], list[str] | None]:
    """The `prompt` field (text, texts, ids or lists of ids) -> token id lists, and the texts when given."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError("the prompt is empty", param="prompt")
    if isinstance(prompt[0], str):
        return [codec.encode(p, add_bos=True) for p in prompt], list(prompt)
    if isinstance(prompt[0], int):
        prompt = [prompt]
    return [list(p) for p in prompt], None
