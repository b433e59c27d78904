"""The OpenAI-compatible HTTP API (FastAPI) over one batching `Engine`.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, and vLLM's
POST /tokenize, POST /detokenize and GET /tokenizer_info (lm-eval's `local-completions` uses the last
three as its "remote" tokenizer). A request becomes one engine request per choice (prompts x n); engine
events come back through an asyncio queue, and `_Choice` turns them into text: incremental
detokenization, stop strings, logprobs. Any way a request ends (done, stop string, error, client gone)
cancels its engine requests, which frees their rows. Prompts are tokenized in a worker thread, so a long
one never stalls the event loop (and /health), and request bodies are bounded by `Limits.max_body_bytes`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from ..errors import read_json
from ..model.zamba2 import Zamba2LM
from ..text.chat import ChatTemplate, ChatTemplateError, TextCodec, read_tokenizer_config
from ..text.tokenizer import Tokenizer
from .engine import Engine, Event, QueueFull
from .engine import Request as EngineRequest
from .protocol import APIError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, usage


@dataclass
class Limits:
    max_batch: int = 16  # rows decoded together
    max_queue: int = 256  # engine requests waiting for a row; more gets 503
    max_n: int = 16  # choices per prompt
    max_prompts: int = 64  # prompts per /v1/completions call
    max_body_bytes: int = 8 * 2**20  # larger request bodies get 413 (a 32k-token prompt is about 150 KB of text)


class _Choice:
    """One choice of a response: the engine request and the text its events have produced so far."""

    def __init__(self, index: int, prompt: list[int], codec: TextCodec, stops: list[str]):
        self.index, self.prompt, self.codec, self.stops = index, prompt, codec, stops
        self.push = codec.tok.stream_decoder()
        for t in prompt[-8:]:  # a little prompt context, so the first word's leading space decodes right
            self.push(t)
        self.text, self.sent = "", 0
        self.tokens: list[int] = []
        self.logprobs: list[tuple[int, float, list]] = []  # (token, logprob, top) per generated token
        self.logprobs_sent = 0
        self.offset = 0  # text_offset of the next token's logprobs entry (streaming)
        self.prompt_logprobs = None
        self.finish: str | None = None
        self.error: str | None = None
        self.request: EngineRequest | None = None

    def feed(self, event: Event) -> None:
        if self.finish is not None:  # finished by a stop string; the engine's late events do not count
            return
        if event.prompt is not None:
            self.prompt_logprobs = event.prompt
        if event.token is not None:
            self.tokens.append(event.token)
            if event.logprob is not None:
                self.logprobs.append((event.token, event.logprob, event.top))
            if event.finish != "stop":  # EOS adds no text
                seen = len(self.text)
                self.text += self.push(event.token)
                if self._cut_at_stop(seen):
                    return
        if event.finish:
            self.finish, self.error = event.finish, event.error

    def _cut_at_stop(self, seen: int) -> bool:
        for s in self.stops:
            at = self.text.find(s, max(0, seen - len(s) + 1))
            if at >= 0:
                self.text, self.finish = self.text[:at], "stop"
                return True
        return False

    def new_text(self) -> str:
        """Text not yet streamed. While running, hold back what could still become a stop string."""
        hold = 0 if self.finish else max((len(s) - 1 for s in self.stops), default=0)
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:end], end
        return out

    def new_logprobs(self) -> list[tuple[int, float, list]]:
        out, self.logprobs_sent = self.logprobs[self.logprobs_sent:], len(self.logprobs)
        return out


class Server:
    def __init__(self, model: Zamba2LM, tokenizer: Tokenizer, folder: str | Path | None, name: str,
                 limits: Limits | None = None):
        self.model, self.name, self.limits = model, name, limits or Limits()
        self.context = model.config.max_position_embeddings
        config = read_tokenizer_config(folder)
        self.codec = TextCodec(tokenizer, config)
        self.template = ChatTemplate(config, self.codec)
        self.eos = model.config.eos_token_ids
        self.defaults = _generation_defaults(folder)
        self.engine = Engine(model, self.limits.max_batch, self.limits.max_queue)
        self.created = int(time.time())

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

    def submit(self, choices: list[_Choice], body, max_tokens: list[int], logprobs: int | None, echo: bool,
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
                                      logprobs=logprobs, echo_logprobs=echo and logprobs is not None)
            requests.append(c.request)
        if len(requests) > self.engine.max_queue:  # 503 would tell the client to retry, which can never succeed
            raise APIError(f"this request needs {len(requests)} sequences (prompts x n) but the server queues at most "
                           f"{self.engine.max_queue} (--max-queue); send fewer prompts or a smaller n", param="n")
        try:
            self.engine.submit(*requests)
        except QueueFull as e:
            raise APIError(str(e), 503, kind="server_overloaded") from None

    def cancel(self, choices: list[_Choice]) -> None:
        for c in choices:
            if c.request is not None and not c.request.cancelled:
                self.engine.cancel(c.request)

    async def run(self, choices: list[_Choice], queue: asyncio.Queue):
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

    async def complete(self, choices: list[_Choice], queue: asyncio.Queue) -> None:
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


async def _parse(request: Request, schema: type[BaseModel], limit: int):
    """The JSON body validated against `schema`; any problem becomes a 400 in OpenAI's error shape, and a body
    over `limit` bytes a 413 (read no further: the header says so, or the count passes it)."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise _too_large(int(size), limit)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise _too_large(len(raw), limit)
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        message = "the body is not valid JSON" if err["type"] == "json_invalid" else err["msg"]
        message = message.removeprefix("Value error, ")  # pydantic's prefix for our own validators' messages
        raise APIError(f"{where}: {message}" if where else message, param=where or None) from None


def _too_large(size: int, limit: int) -> APIError:
    return APIError(f"the request body is {size} bytes or more; this server accepts at most {limit} "
                    "(--max-body-bytes)", 413)


def _sse(data) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


def create_app(server: Server) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="zamba2", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown routes, wrong methods: same error shape
        return JSONResponse(APIError(str(e.detail), e.status_code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):
        return JSONResponse(APIError(f"internal error: {type(e).__name__}: {e}", 500, kind="server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", **server.engine.load}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "zamba2", "max_model_len": server.context}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        codec = server.codec
        return {"tokenizer_class": "zamba2", "bos_token": codec.bos_token, "eos_token": codec.eos_token,
                "pad_token": codec.pad_token, "chat_template": server.template.source,
                "model_max_length": server.context}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _parse(request, TokenizeRequest, server.limits.max_body_bytes)
        server.check_model(body.model)
        if body.messages is not None:
            ids = await asyncio.to_thread(server.chat_prompt, body.messages, body.add_generation_prompt)
        else:
            ids = await asyncio.to_thread(server.codec.encode, body.prompt, add_bos=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": server.context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _parse(request, DetokenizeRequest, server.limits.max_body_bytes)
        server.check_model(body.model)
        vocab = server.model.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": server.codec.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest, server.limits.max_body_bytes)
        server.check_model(body.model)
        prompts, texts = await asyncio.to_thread(_prompts, body.prompt, server.codec)  # off the event loop
        if len(prompts) > server.limits.max_prompts:
            raise APIError(f"at most {server.limits.max_prompts} prompts per request", param="prompt")
        if body.n > server.limits.max_n:
            raise APIError(f"n must be at most {server.limits.max_n}", param="n")
        max_tokens = [server.check_prompt(p, body.max_tokens) for p in prompts]
        n = body.n
        choices = [_Choice(i * n + j, p, server.codec, body.stops) for i, p in enumerate(prompts) for j in range(n)]
        queue: asyncio.Queue = asyncio.Queue()
        server.submit(choices, body, [max_tokens[c.index // n] for c in choices], body.logprobs, body.echo, queue)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)

        def head(c: _Choice) -> tuple[str, dict | None]:
            """The echoed prompt text and logprobs that precede a choice's completion."""
            text = ""
            if body.echo:  # the prompt as sent, or its decoded ids
                text = texts[c.index // n] if texts is not None else server.codec.decode(c.prompt)
            lp = None
            if body.echo and body.logprobs is not None:
                lp = server.completion_logprobs(c.prompt, c.prompt_logprobs or [None] * len(c.prompt))
            return text, lp

        def logprobs_of(c: _Choice, entries, offset: int) -> dict:
            lp = server.completion_logprobs([t for t, _, _ in entries], [(lp, top) for _, lp, top in entries], offset)
            c.offset = lp["text_offset"][-1] + len(lp["tokens"][-1]) if entries else offset
            return lp

        if body.stream:
            async def events():
                started: set[int] = set()
                async for c in server.run(choices, queue):
                    if c.error:
                        server.cancel(choices)
                        yield _sse(APIError(c.error, 500, kind="server_error").body())
                        break
                    text, lp = "", None
                    if c.index not in started and (c.tokens or c.finish):
                        started.add(c.index)
                        text, lp = head(c)
                        c.offset = len(text)
                    text += c.new_text()
                    entries = c.new_logprobs()
                    if body.logprobs is not None:
                        more = logprobs_of(c, entries, c.offset)
                        lp = more if lp is None else {k: lp[k] + more[k] for k in lp}
                    if text or lp or c.finish:
                        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": server.name,
                                    "choices": [{"index": c.index, "text": text, "logprobs": lp,
                                                 "finish_reason": c.finish}]})
                else:
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": server.name,
                                "choices": [], "usage": usage(prompt_tokens, sum(len(c.tokens) for c in choices))})
                yield _sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")

        await server.complete(choices, queue)
        out = []
        for c in choices:
            text, lp = head(c)
            if body.logprobs is not None:
                gen = logprobs_of(c, c.logprobs, len(text))
                lp = gen if lp is None else {k: lp[k] + gen[k] for k in lp}
            out.append({"index": c.index, "text": text + c.text, "logprobs": lp, "finish_reason": c.finish})
        return {"id": rid, "object": "text_completion", "created": created, "model": server.name, "choices": out,
                "usage": usage(prompt_tokens, sum(len(c.tokens) for c in choices))}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _parse(request, ChatRequest, server.limits.max_body_bytes)
        server.check_model(body.model)
        if body.n > server.limits.max_n:
            raise APIError(f"n must be at most {server.limits.max_n}", param="n")
        prompt = await asyncio.to_thread(server.chat_prompt, body.messages, body.add_generation_prompt,
                                         body.chat_template_kwargs)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = server.check_prompt(prompt, limit)
        choices = [_Choice(j, prompt, server.codec, body.stops) for j in range(body.n)]
        queue: asyncio.Queue = asyncio.Queue()
        k = body.top_logprobs or 0
        server.submit(choices, body, [max_tokens] * body.n, k if body.logprobs else None, False, queue)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if body.stream:
            async def events():
                def chunk(c, delta, lp=None, finish=None):
                    return _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                 "model": server.name, "choices": [{"index": c.index, "delta": delta, "logprobs": lp,
                                                                    "finish_reason": finish}]})

                for c in choices:
                    yield chunk(c, {"role": "assistant", "content": ""})
                async for c in server.run(choices, queue):
                    if c.error:
                        server.cancel(choices)
                        yield _sse(APIError(c.error, 500, kind="server_error").body())
                        break
                    delta, entries = c.new_text(), c.new_logprobs()
                    lp = server.chat_logprobs(entries, k) if body.logprobs and entries else None
                    if delta or lp or c.finish:
                        yield chunk(c, {"content": delta} if delta else {}, lp, c.finish)
                else:
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": server.name, "choices": [],
                                "usage": usage(len(prompt), sum(len(c.tokens) for c in choices))})
                yield _sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")

        await server.complete(choices, queue)
        return {"id": rid, "object": "chat.completion", "created": created, "model": server.name,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": server.chat_logprobs(c.logprobs, k) if body.logprobs else None,
                             "finish_reason": c.finish} for c in choices],
                "usage": usage(len(prompt), sum(len(c.tokens) for c in choices))}

    return app


def _prompts(prompt, codec: TextCodec) -> tuple[list[list[int]], list[str] | None]:
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


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "float32", device: str = "cpu",
          name: str | None = None, limits: Limits | None = None, int8: bool = False) -> None:
    """Load a checkpoint and serve it with uvicorn until interrupted."""
    import torch
    import uvicorn

    from ..infer.quant import quantize_int8
    from ..model.checkpoint import load
    from ..ops import kernels
    from ..text.tokenizer import load_tokenizer

    model = load(model_path, dtype=getattr(torch, dtype), device=device)
    if int8:
        quantize_int8(model)
    if model.device.type == "cpu":
        kernels.get()  # built or loaded now, before the server reports healthy, never inside a request
    tokenizer = load_tokenizer(model_path, model.config.vocab_size)
    server = Server(model, tokenizer, model_path, name or Path(model_path).resolve().name, limits)
    print(f"zamba2 serve: {server.name} on http://{host}:{port}/v1 (max batch {server.limits.max_batch})", flush=True)
    uvicorn.run(create_app(server), host=host, port=port, log_level="warning")
