"""The HTTP side: FastAPI routes for the OpenAI API, the health check and the web chat page.

Routes run on the event loop and never touch the model: they check the request, tokenize its prompt (in a
thread), hand a :class:`glmport.serve.worker.Job` to the generation thread and relay its events, as one JSON
answer or as server-sent events. Every answer that is not a 200 is OpenAI's error shape
(:class:`glmport.serve.protocol.APIError`), unknown paths included.

Security, besides the bounds in :mod:`glmport.serve.limits`: with ``--api-key`` every ``/v1`` route needs the
key (the page and ``/health`` hold nothing secret); ``POST`` bodies must be declared ``application/json``,
which a web page of another origin cannot send without the browser asking first (and this server grants no
cross-origin requests), so no other site can spend your model's time; and without an API key only loopback
``Host`` headers are served, so that a site cannot reach the server by pointing its own domain name at
127.0.0.1 (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import logging
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from glmport.errors import GlmportError
from glmport.infer import GenerationSettings
from glmport.serve import protocol
from glmport.serve.limits import InFlightLimit, Limits, LoopbackHostOnly, check_api_key, read_body
from glmport.serve.prompt import prompt_messages, reply_message
from glmport.serve.protocol import APIError, bad_request, parse_chat_request
from glmport.serve.worker import Job, QueueFull

log = logging.getLogger("glmport")
POLL_SECONDS = 0.25  # how often a waiting request looks whether its client is still there
PAGE_FILES = {"index.html": "text/html; charset=utf-8", "chat.js": "text/javascript; charset=utf-8",
              "chat.css": "text/css; charset=utf-8"}
PAGE_HEADERS = {
    # The page loads nothing from anywhere else and may only talk to this server.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class _Disconnected(Exception):
    """The client went away while its request waited."""


def create_app(models, worker, limits: Limits, *, api_key: str | None, backend_name: str):
    """The ASGI app serving ``models`` (:class:`glmport.serve.models.ModelSet`) through ``worker``."""
    app = FastAPI(title="glmport serve", docs_url=None, redoc_url=None, openapi_url=None)
    template = models.bundle.template
    context = limits.context_length or models.context_length()
    created = int(time.time())
    page = {name: resources.files("glmport.serve").joinpath("static", name).read_bytes() for name in PAGE_FILES}

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"Unknown path {request.url.path}: this server has POST /v1/chat/completions, GET /v1/models, "
                        "GET /health and the chat page at /",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        error = APIError(exc.status_code, message, code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code))
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.error("internal error on %s %s: %r", request.method, request.url.path, exc)
        error = APIError(500, "internal server error (see the server's log)", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    def authorize(request: Request) -> None:
        check_api_key(request.headers.get("authorization"), api_key)

    # --- the page and the health check -------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return Response(page["index.html"], media_type=PAGE_FILES["index.html"], headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in PAGE_FILES or name == "index.html":
            raise StarletteHTTPException(404)
        return Response(page[name], media_type=PAGE_FILES[name], headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        return {"status": "ok", "backend": backend_name, "queue": worker.stats(), "api_key": api_key is not None}

    # --- the API -------------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [_model_card(entry, created) for entry in models.entries.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        authorize(request)
        if name not in models.entries:
            raise _unknown_model(name, models)
        return _model_card(models.entries[name], created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise APIError(415, f"Content-Type {kind or '(none)'}: send the body as JSON with "
                                "'Content-Type: application/json'", code="unsupported_media_type")
        try:
            raw = await read_body(request, limits.max_body_bytes)
        except ClientDisconnect:  # the client went away while sending
            return Response(status_code=499)
        chat = parse_chat_request(raw)
        if chat.model not in models.entries:
            raise _unknown_model(chat.model, models)
        messages = prompt_messages(chat, template)
        prompt_ids = await run_in_threadpool(_prompt_ids, template, messages)
        max_tokens = _token_budget(chat, len(prompt_ids), context, limits.max_tokens)
        settings = GenerationSettings(max_new_tokens=max_tokens, temperature=chat.temperature, top_p=chat.top_p,
                                      seed=chat.seed)
        job = Job(chat.model, prompt_ids, settings, chat.stop, loop=asyncio.get_running_loop())
        try:
            worker.submit(job)
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}; retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        try:
            await _wait_started(job, request, limits.queue_timeout)
            if chat.stream:
                return StreamingResponse(_stream(job, chat, template, worker), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return await _complete(job, chat, template, request)
        except _Disconnected:
            worker.cancel(job)
            return Response(status_code=499)  # nobody reads it: the client closed the connection
        except BaseException:
            worker.cancel(job)
            raise

    if api_key is None:
        app.add_middleware(LoopbackHostOnly)
    app.add_middleware(InFlightLimit, limit=limits.max_concurrent)  # added last: runs first
    return app


def _model_card(entry, created: int) -> dict:
    card = {"id": entry.name, "object": "model", "created": created, "owned_by": "glmport"}
    if entry.parent:
        card["parent"] = entry.parent
    return card


def _unknown_model(name: str, models) -> APIError:
    return APIError(404, f"The model `{name}` does not exist on this server; it serves {', '.join(models.names)} "
                         "(GET /v1/models)", param="model", code="model_not_found")


def _prompt_ids(template, messages) -> list[int]:
    try:
        return template.prompt_ids(messages)
    except (GlmportError, ValueError, TypeError, KeyError) as exc:  # e.g. a tool schema the template cannot render
        raise bad_request(f"the conversation cannot be written in the {template.name} format: {exc}") from None


def _token_budget(chat, prompt_tokens: int, context: int, cap: int) -> int:
    """``max_tokens`` for this request: what it asked for (at most ``cap``), else what fits, up to ``cap``."""
    room = context - prompt_tokens
    if chat.max_tokens is not None and chat.max_tokens > cap:
        raise bad_request(f"max_tokens: {chat.max_tokens} is more than this server generates per request ({cap}, "
                          "--max-tokens)", param="max_tokens")
    wanted = chat.max_tokens if chat.max_tokens is not None else min(cap, room)
    if room < 1 or prompt_tokens + wanted > context:
        raise bad_request(f"This model's maximum context length is {context} tokens. However, you requested "
                          f"{prompt_tokens + max(wanted, 1)} tokens ({prompt_tokens} in the messages, {max(wanted, 1)} "
                          "in the completion). Please reduce the length of the messages or completion.",
                          param="messages", code="context_length_exceeded")
    return wanted


async def _next_event(job: Job, request: Request, deadline: float | None = None):
    """The job's next event; raises :class:`_Disconnected` when the client leaves and TimeoutError past
    ``deadline`` (monotonic seconds)."""
    while True:
        timeout = POLL_SECONDS if deadline is None else max(0.0, min(POLL_SECONDS, deadline - time.monotonic()))
        try:
            return await asyncio.wait_for(job.events.get(), timeout)
        except asyncio.TimeoutError:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError from None
            if await request.is_disconnected():
                raise _Disconnected from None


async def _wait_started(job: Job, request: Request, queue_timeout: float) -> None:
    try:
        kind, value = await _next_event(job, request, time.monotonic() + queue_timeout)
    except TimeoutError:
        raise APIError(503, f"the request waited {queue_timeout:g} s for the model without getting its turn "
                            "(--queue-timeout); retry later", type="server_error", code="queue_timeout",
                       headers={"Retry-After": "5"}) from None
    if kind == "error":
        raise _generation_error(value)
    assert kind == "started", kind


async def _complete(job: Job, chat, template, request: Request):
    while True:
        kind, value = await _next_event(job, request)
        if kind == "error":
            raise _generation_error(value)
        if kind == "done":
            message, finish, _ = reply_message(value, template, bool(chat.tools))
            usage = protocol.usage(value.prompt_tokens, value.completion_tokens)
            return protocol.completion(protocol.completion_id(), protocol.now(), chat.model, message, finish, usage)


async def _stream(job: Job, chat, template, worker):
    """Server-sent events: the role, each piece of text as it is generated, then the tool call or the rest,
    the finish reason, the usage when asked for, and ``[DONE]``. A client that disconnects cancels its job
    (this generator is cancelled, and ``finally`` frees the slot)."""
    id_, created = protocol.completion_id(), protocol.now()
    sent = ""
    try:
        yield protocol.sse(protocol.chunk(id_, created, chat.model, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await job.events.get()
            if kind == "delta":
                sent += value
                yield protocol.sse(protocol.chunk(id_, created, chat.model, {"content": value}))
            elif kind == "error":
                yield protocol.sse(_generation_error(value).body())
                break
            elif kind == "done":
                message, finish, text = reply_message(value, template, bool(chat.tools))
                rest = text[len(sent):] if text.startswith(sent) else ""
                if rest:
                    yield protocol.sse(protocol.chunk(id_, created, chat.model, {"content": rest}))
                if message.get("tool_calls"):
                    calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
                    yield protocol.sse(protocol.chunk(id_, created, chat.model, {"tool_calls": calls}))
                yield protocol.sse(protocol.chunk(id_, created, chat.model, {}, finish))
                if chat.include_usage:
                    usage = protocol.usage(value.prompt_tokens, value.completion_tokens)
                    yield protocol.sse(protocol.chunk(id_, created, chat.model, None, usage_=usage))
                break
        yield protocol.sse("[DONE]")
    finally:
        worker.cancel(job)  # a no-op when the job is done; otherwise the client is gone


def _generation_error(exc: BaseException) -> APIError:
    if isinstance(exc, GlmportError):  # e.g. the 64-bit guard refused a forward: the message says where
        return APIError(500, f"generation failed: {exc}", type="server_error", code=type(exc).__name__)
    return APIError(500, f"generation failed: {type(exc).__name__} (see the server's log)", type="server_error")
