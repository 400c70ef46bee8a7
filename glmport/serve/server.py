"""Starting and stopping one server: the socket, the model, the generation thread, uvicorn.

The socket is bound before the model loads, so a port in use or a host that cannot be bound is an error
in a second, not after minutes of loading. The address is printed on stdout once the server answers
(``glmport serve: http://127.0.0.1:8000``; with ``--port 0`` the system picks a free port, which the line
shows). Ctrl-C or SIGTERM stops it: uvicorn stops accepting, the generation thread cancels what is queued
and running, the patches are undone, and the command exits 130 like every interrupted glmport command.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from glmport.errors import ConfigError, GlmportError, Problem
from glmport.serve.limits import Limits, is_loopback

log = logging.getLogger("glmport")


@dataclass
class ServeOptions:
    model: Path
    adapters: list[tuple[str, Path]]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    name: str | None = None
    limits: Limits = field(default_factory=Limits)
    guard: str = "auto"  # --guard-64bit
    dtype: str = "auto"
    base: Path | None = None
    trust_remote_code: bool | None = None
    allow_unverified_patches: bool = False
    access_log: bool = True


def require_extra() -> None:
    """FastAPI and uvicorn come with ``pip install glmport[serve]``."""
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise GlmportError(f"glmport serve needs {' and '.join(missing)}, which are not installed", [Problem(
            "glmport serve", "the server runs on FastAPI and uvicorn, an optional extra",
            'pip install "glmport[serve]"')])


def check_address(options: ServeOptions) -> None:
    if not is_loopback(options.host) and not options.api_key:
        raise ConfigError(f"--host {options.host}: binding beyond this machine needs an API key", [Problem(
            "--api-key", f"{options.host} is not a loopback address, and without a key anyone who can reach it can "
                         "use the model", "pass --api-key KEY (or set GLMPORT_API_KEY); clients send "
                                          "'Authorization: Bearer KEY'")])
    if not 0 <= options.port <= 65535:
        raise ConfigError(f"--port {options.port}: not a port", [Problem("--port", "ports are 0 to 65535",
                                                                          "e.g. 8000, or 0 for any free port")])


def bind(host: str, port: int) -> socket.socket:
    """A bound socket (listening starts when uvicorn serves), or an error that names the flag."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}", [Problem(
            "--port" if exc.errno == errno.EADDRINUSE else "--host", f"{host}:{port}: {exc.strerror}",
            "choose another --port (0 picks a free one), or stop what is using it")]) from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def run(options: ServeOptions, manager, backend) -> int:
    """Serve until interrupted; ``backend`` is active (:meth:`glmport.backend.Backend.activate`)."""
    sock = bind(options.host, options.port)  # first: a port in use is an error before anything loads
    try:
        import uvicorn

        from glmport.modeling import RemoteCodeConsent
        from glmport.serve.app import create_app
        from glmport.serve.models import load_models
        from glmport.serve.worker import Worker
        from glmport.train.guarded import guard_mode_for

        consent = RemoteCodeConsent(trust=options.trust_remote_code, allow_unverified=options.allow_unverified_patches)
        models = load_models(options.model, options.adapters, backend, patch_sets=manager.patch_sets,
                             consent=consent, dtype=options.dtype, base=options.base, name=options.name)
    except BaseException:
        sock.close()
        raise
    worker = Worker(models, max_waiting=options.limits.max_queue, guard_mode=guard_mode_for(options.guard, backend))
    try:
        app = create_app(models, worker, options.limits, api_key=options.api_key, backend_name=backend.name)
        worker.start()
        config = uvicorn.Config(app, log_config=None, log_level="info", access_log=options.access_log,
                                timeout_keep_alive=5, timeout_graceful_shutdown=5, lifespan="off")
        context = options.limits.context_length or models.context_length()
        log.info("%s on %s (guard %s), context %d tokens; limits: body %d bytes, %d waiting, %g s queue timeout, "
                 "%d tokens per reply, %d requests in progress", models.bundle.description, backend.name,
                 worker.guard_mode or "off", context, options.limits.max_body_bytes, options.limits.max_queue,
                 options.limits.queue_timeout, options.limits.max_tokens, options.limits.max_concurrent)
        server = _announcing_server(config, f"glmport serve: {url_of(sock)} (models: {', '.join(models.names)})")
        server.run(sockets=[sock])
        if not server.started:  # uvicorn could not serve on the socket (it logged why)
            raise GlmportError(f"the server did not start on {url_of(sock)}")
    finally:
        worker.stop()
        models.bundle.close()
        sock.close()
        sys.stdout.flush()
    return 0


def _announcing_server(config, announcement: str):
    """uvicorn's server, printing ``announcement`` on stdout once it accepts connections (tests and scripts
    wait for that line)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                print(announcement, flush=True)

    return Server(config)
