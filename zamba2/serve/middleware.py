"""What every HTTP request passes through before its route (a plain ASGI middleware, so streamed responses are
timed to their last byte): a request id, the API key, the drain, one access-log line and the request counter.

- Request id: the client's `x-request-id` when it sends a short printable one, else a fresh one; returned in the
  response's `x-request-id` header (the openai client exposes it as `_request_id`) and written in the log line.
- API key (`--api-key` / ZAMBA2_API_KEY): every route but /health needs `Authorization: Bearer KEY`, compared in
  constant time; otherwise 401 in OpenAI's error shape.
- Drain (SIGTERM, app.py): once `server.draining` is set, new requests get 503 while the running ones (counted
  in `server.in_flight`) finish; /health says "draining" with 503 so that a load balancer stops sending.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from .protocol import APIError

log = logging.getLogger("zamba2.access")
OPEN = {"/health"}  # answered without the API key


class Gate:
    def __init__(self, app, server, routes: set[str], api_key: str | None = None):
        self.app, self.server, self.routes = app, server, routes
        self.key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rid = _request_id(headers.get(b"x-request-id", b""))
        path, t0, status = scope["path"], time.perf_counter(), [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            refusal = self._refusal(path, headers)
            if refusal is not None:
                await _answer(send_with_id, refusal)
            else:
                self.server.in_flight += 1  # one event loop: no lock needed
                try:
                    await self.app(scope, receive, send_with_id)
                finally:
                    self.server.in_flight -= 1
        finally:
            route = path if path in self.routes else "other"  # unknown paths share one label
            self.server.metrics.requests.labels(route, str(status[0])).inc()
            client = scope.get("client") or ("-", 0)
            log.info('%s "%s %s" %d %.1f ms id=%s', client[0], scope["method"], path, status[0],
                     1000 * (time.perf_counter() - t0), rid)

    def _refusal(self, path: str, headers: dict) -> APIError | None:
        if self.server.draining:
            if path == "/health":
                return APIError("draining", 503, kind="server_shutting_down")
            return APIError("the server is shutting down; retry on another replica", 503,
                            kind="server_shutting_down")
        if self.key is not None and path not in OPEN and not hmac.compare_digest(
                headers.get(b"authorization", b""), self.key):
            return APIError("missing or incorrect API key: send `Authorization: Bearer <key>` (the server's "
                            "--api-key)", 401, code="invalid_api_key")
        return None


def _request_id(sent: bytes) -> str:
    text = sent.decode("ascii", "replace")
    if 0 < len(text) <= 128 and text.isprintable() and " " not in text:
        return text
    return uuid.uuid4().hex


async def _answer(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
