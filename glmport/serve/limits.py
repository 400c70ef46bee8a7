"""What keeps one server answering under bad input and load: every bound, and where it is enforced.

| bound | answer | where |
| --- | --- | --- |
| request body size (``--max-body-bytes``) | 413 | :func:`read_body`, before the body is parsed; a declared Content-Length over the bound is refused unread |
| requests in progress at once (``--max-concurrent``) | 503 | :class:`InFlightLimit`, before a route runs |
| requests waiting for the generation slot (``--max-queue``) | 429 | the worker's queue (:class:`glmport.serve.worker.QueueFull`) |
| time waiting for the slot (``--queue-timeout``) | 503 | the route, while it waits for its job to start |
| prompt + ``max_tokens`` against the context | 400 ``context_length_exceeded`` | the route, after tokenizing |
| ``max_tokens`` (``--max-tokens``) | 400 | the route; it is also the default when a request gives none |
| the API key (``--api-key``) | 401 | :func:`check_api_key`, compared in constant time |

A request that breaks a bound costs the server what it read of it and nothing more: nothing waits on the
model for it, and no other request waits on it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from dataclasses import dataclass

from glmport.serve.protocol import APIError


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    max_concurrent: int = 64
    max_queue: int = 16
    queue_timeout: float = 60.0
    max_tokens: int = 1024
    context_length: int | None = None  # None: the model's own


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "Content-Length is not a number", param="Content-Length")
        if int(declared) > limit:
            raise too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit, at_least=True)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(size: int, limit: int, at_least: bool = False) -> APIError:
    return APIError(413, f"the request body is {'over ' if at_least else ''}{size} bytes; this server takes at most "
                         f"{limit} (--max-body-bytes)", code="request_too_large")


def check_api_key(header: str | None, key: str | None) -> None:
    """With ``--api-key``, every API request carries ``Authorization: Bearer KEY``. The comparison takes
    the same time whatever the key sent, so it cannot be guessed byte by byte from response times."""
    if key is None:
        return
    scheme, _, sent = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not sent:
        raise APIError(401, "You didn't provide an API key: send it as 'Authorization: Bearer KEY' (the server "
                            "was started with --api-key)", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(sent.strip().encode("utf-8"), key.encode("utf-8")):
        raise APIError(401, "Incorrect API key provided", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server to this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


async def send_error(send, error: APIError) -> None:
    """Answer ``error`` straight from ASGI middleware (before any route runs)."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(key.lower().encode(), value.encode()) for key, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class InFlightLimit:
    """ASGI middleware: at most ``limit`` HTTP requests in progress; the next gets 503 at once (in OpenAI's
    error shape), so a flood costs a few bytes per connection, not a task each."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit
        self.active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            await send_error(send, APIError(503, f"the server has {self.active} requests in progress (--max-concurrent "
                                                 f"{self.limit}); retry shortly", type="server_error",
                                            code="server_busy", headers={"Retry-After": "1"}))
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


class LoopbackHostOnly:
    """ASGI middleware for a server without an API key: only requests addressed to a loopback name are served.
    A web page cannot then reach it by pointing a domain name of its own at 127.0.0.1 (DNS rebinding)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
            if name not in LOOPBACK_NAMES and not is_loopback(name):
                await send_error(send, APIError(400, f"Host {host!r} is not served: without --api-key this server "
                                                     "answers only requests addressed to 127.0.0.1, localhost or [::1]",
                                                code="invalid_host"))
                return
        await self.app(scope, receive, send)
