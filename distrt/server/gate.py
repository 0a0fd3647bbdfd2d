"""The ASGI gate in front of the API routes: auth (401), draining (503), body size (413), concurrency (429).

Only `/v1/*` (and `/debug/*`) pass through it; `/health`, `/metrics`, `/version` and the docs stay public.
It also counts the requests in flight, which is what a SIGTERM drain waits on.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from distrt.server.errors import APIError

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
_GATED_PREFIXES = ("/v1/", "/debug/")


@dataclass
class GateState:
    draining: bool = False
    in_flight: int = 0  # gated requests being served (drain waits for 0)
    generating: int = 0  # generation requests being served (the concurrency limit)


class Gate:
    def __init__(self, app: ASGIApp, *, state: GateState, api_key: str | None, max_request_bytes: int,
                 max_concurrent_requests: int) -> None:
        self.app = app
        self.state = state
        self.api_key = api_key.encode() if api_key else None
        self.max_request_bytes = max_request_bytes
        self.max_concurrent_requests = max_concurrent_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(_GATED_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.api_key is not None and not self._authorized(headers.get("authorization", b"")):
            await _reject(send, APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                         code="invalid_api_key"), {"www-authenticate": "Bearer"})
            return
        if self.state.draining:
            await _reject(send, APIError(503, "the server is shutting down", code="server_draining"))
            return
        generating = scope.get("method") == "POST" and path in GENERATION_PATHS
        if generating and self.state.generating >= self.max_concurrent_requests:
            await _reject(send, APIError(429, f"too many concurrent requests (limit "
                                              f"{self.max_concurrent_requests}); retry later",
                                         code="too_many_requests"), {"retry-after": "1"})
            return
        self.state.in_flight += 1
        self.state.generating += generating
        try:
            replay = await self._read_body(headers, receive)
            if replay is None:
                await _reject(send, APIError(413, f"request body is larger than {self.max_request_bytes} bytes",
                                             code="request_too_large"))
                return
            await self.app(scope, replay, send)
        finally:
            self.state.in_flight -= 1
            self.state.generating -= generating

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key or b"")

    async def _read_body(self, headers: dict[str, bytes], receive: Receive) -> Receive | None:
        """Reads the whole body up to the limit; returns a receive that replays it, or None if too large."""
        declared = headers.get("content-length", b"")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return _replay([msg], receive)  # the client left; let the app see the disconnect
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_request_bytes:
                return None
            if not msg.get("more_body", False):
                break
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def _reject(send: Send, err: APIError, extra: dict[str, str] | None = None) -> None:
    resp = err.response(headers=extra)
    await send({"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body, "more_body": False})
