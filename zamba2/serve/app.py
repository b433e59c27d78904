"""The OpenAI-compatible HTTP API (FastAPI): routes only, over one `Server` (server.py).

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics
(Prometheus), and vLLM's POST /tokenize, POST /detokenize and GET /tokenizer_info (lm-eval's
`local-completions` uses the last three as its "remote" tokenizer). Every request first passes the `Gate`
(middleware.py: request id, API key, drain, access log). A route parses and bounds the body (`Limits.max_body_bytes`), hands
the request to the Server and shapes the response; a streamed one goes through `_stream`, the one
loop for both endpoints. Prompts are tokenized in a worker thread, so a long one never stalls the event
loop (and /health).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from .choice import Choice
from .middleware import Gate
from .protocol import APIError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, usage
from .server import Limits, Server, encode_prompts


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


async def _stream(server: Server, choices: list[Choice], queue: asyncio.Queue, envelope: Callable[..., dict],
                  chunk: Callable[[Choice], dict | None], usage_of: Callable[[], dict],
                  first: list[dict] = ()) -> AsyncIterator[str]:
    """Server-sent events of a streamed response: `first` choice chunks, then chunk(c) each time a choice
    changes (None: nothing to send), then a usage chunk and [DONE]. An engine error cancels every choice
    and ends the stream with the error in OpenAI's shape (no usage chunk)."""
    for data in first:
        yield _sse(envelope([data]))
    async for c in server.run(choices, queue):
        if c.error:
            server.cancel(choices)
            yield _sse(APIError(c.error, 500, kind="server_error").body())
            break
        data = chunk(c)
        if data is not None:
            yield _sse(envelope([data]))
    else:
        yield _sse(envelope([], usage=usage_of()))
    yield _sse("[DONE]")


def create_app(server: Server, api_key: str | None = None) -> FastAPI:
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

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

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
        prompts, texts = await asyncio.to_thread(encode_prompts, body.prompt, server.codec)  # off the event loop
        if len(prompts) > server.limits.max_prompts:
            raise APIError(f"at most {server.limits.max_prompts} prompts per request", param="prompt")
        if body.n > server.limits.max_n:
            raise APIError(f"n must be at most {server.limits.max_n}", param="n")
        max_tokens = [server.check_prompt(p, body.max_tokens) for p in prompts]
        n = body.n
        choices = [Choice(i * n + j, p, server.codec, body.stops) for i, p in enumerate(prompts) for j in range(n)]
        queue: asyncio.Queue = asyncio.Queue()
        server.submit(choices, body, [max_tokens[c.index // n] for c in choices], body.logprobs, body.echo, queue)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)

        def head(c: Choice) -> tuple[str, dict | None]:
            """The echoed prompt text and logprobs that precede a choice's completion."""
            text = ""
            if body.echo:  # the prompt as sent, or its decoded ids
                text = texts[c.index // n] if texts is not None else server.codec.decode(c.prompt)
            lp = None
            if body.echo and body.logprobs is not None:
                lp = server.completion_logprobs(c.prompt, c.prompt_logprobs or [None] * len(c.prompt))
            return text, lp

        def logprobs_of(c: Choice, entries, offset: int) -> dict:
            lp = server.completion_logprobs([t for t, _, _ in entries], [(lp, top) for _, lp, top in entries], offset)
            c.offset = lp["text_offset"][-1] + len(lp["tokens"][-1]) if entries else offset
            return lp

        def envelope(out: list[dict], **more) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": server.name, "choices": out,
                    **more}

        def usage_of() -> dict:
            return usage(prompt_tokens, sum(len(c.tokens) for c in choices))

        if body.stream:
            started: set[int] = set()

            def chunk(c: Choice) -> dict | None:
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
                    return {"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish}
                return None

            return StreamingResponse(_stream(server, choices, queue, envelope, chunk, usage_of),
                                     media_type="text/event-stream")

        await server.complete(choices, queue)
        out = []
        for c in choices:
            text, lp = head(c)
            if body.logprobs is not None:
                gen = logprobs_of(c, c.logprobs, len(text))
                lp = gen if lp is None else {k: lp[k] + gen[k] for k in lp}
            out.append({"index": c.index, "text": text + c.text, "logprobs": lp, "finish_reason": c.finish})
        return envelope(out, usage=usage_of())

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
        choices = [Choice(j, prompt, server.codec, body.stops) for j in range(body.n)]
        queue: asyncio.Queue = asyncio.Queue()
        k = body.top_logprobs or 0
        server.submit(choices, body, [max_tokens] * body.n, k if body.logprobs else None, False, queue)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def usage_of() -> dict:
            return usage(len(prompt), sum(len(c.tokens) for c in choices))

        if body.stream:
            def envelope(out: list[dict], **more) -> dict:
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.name,
                        "choices": out, **more}

            def chunk(c: Choice) -> dict | None:
                delta, entries = c.new_text(), c.new_logprobs()
                lp = server.chat_logprobs(entries, k) if body.logprobs and entries else None
                if delta or lp or c.finish:
                    return {"index": c.index, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                            "finish_reason": c.finish}
                return None

            first = [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for c in choices]
            return StreamingResponse(_stream(server, choices, queue, envelope, chunk, usage_of, first),
                                     media_type="text/event-stream")

        await server.complete(choices, queue)
        return {"id": rid, "object": "chat.completion", "created": created, "model": server.name,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": server.chat_logprobs(c.logprobs, k) if body.logprobs else None,
                             "finish_reason": c.finish} for c in choices],
                "usage": usage_of()}

    app.add_middleware(Gate, server=server, routes={r.path for r in app.routes}, api_key=api_key)
    return app


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "float32", device: str = "cpu",
          name: str | None = None, limits: Limits | None = None, int8: bool = False, int4: bool = False,
          api_key: str | None = None, drain_timeout: float = 30.0, revision: str | None = None, draft=None,
          num_speculative: int | None = None) -> None:
    """Load a checkpoint (a folder, or a Hub repo id at `revision`) and serve it with uvicorn until interrupted
    (SIGINT) or drained (SIGTERM). `draft` (a loaded model or "prompt-lookup"), `num_speculative`: speculative
    decoding for a request alone in the batch (engine.py)."""
    from ..hub import resolve, served_name
    from ..infer.generate import generate
    from ..infer.load import load_for_inference
    from ..ops import kernels

    folder = resolve(model_path, revision)
    model, tokenizer = load_for_inference(folder, dtype, device, int8, int4)
    if model.device.type == "cpu":
        kernels.get()  # built or loaded now, before the server reports healthy, never inside a request
    for warmed in (model, draft) if draft is not None and not isinstance(draft, str) else (model,):
        generate(warmed, [[model.config.bos_token_id or 0]], 2)  # first-call costs (compiled step, ...) paid here
    server = Server(model, tokenizer, folder, name or served_name(model_path), limits, draft, num_speculative)
    _log_access()
    config = uvicorn.Config(create_app(server, api_key), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=5)
    auth = "API key required" if api_key else "no API key"
    spec = "" if draft is None else ", speculative: " + (draft if isinstance(draft, str) else "draft model")
    print(f"zamba2 serve: {server.name} on http://{host}:{port}/v1 (max batch {server.limits.max_batch}, {auth}"
          f"{spec})", flush=True)
    _Draining(config, server, drain_timeout).run()


class _Draining(uvicorn.Server):
    """uvicorn's server, except that SIGTERM drains first: new requests get 503 (middleware.Gate), the running
    ones finish for up to `timeout` seconds (the engine then ends what is left with an error), then uvicorn shuts
    down and the process exits 0. A second SIGTERM, or SIGINT, stops at once as uvicorn does."""

    def __init__(self, config: uvicorn.Config, server: Server, timeout: float):
        super().__init__(config)
        self.server, self.timeout = server, timeout

    def handle_exit(self, sig, frame):
        if sig != signal.SIGTERM or self.server.draining:
            return super().handle_exit(sig, frame)
        self.server.draining = True
        threading.Thread(target=self._drain, name="zamba2-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.timeout
        while self.server.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        cut = self.server.in_flight
        self.server.engine.stop()  # what is still running ends with "the server is shutting down"
        print(f"zamba2 serve: drained ({cut} requests cut short)", flush=True)
        self.should_exit = True


def _log_access() -> None:
    """One line per request on stdout (middleware.Gate writes it)."""
    import logging
    import sys

    log = logging.getLogger("zamba2.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
