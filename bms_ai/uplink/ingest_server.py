"""`bms-ai ingest-server`: reference cloud-side ingest for uploaded segments (aiohttp, asyncio).

Wire protocol (what :class:`bms_ai.uplink.backends.HttpBackend` speaks):
``PUT [<prefix>]/segments/<sha256>`` (or ``POST [<prefix>]/segments`` with
``X-Content-SHA256``), ``Authorization: Bearer <token>``, a ``Content-Length``.
The body is streamed to ``tmp/`` while hashed, fsynced and renamed to
``objects/<sha256>`` only if the hash matches. Idempotent by content: 201 the
first time, 200 after. ``GET /segments`` lists what is stored, ``GET /healthz``
answers without a token.

Hardened for the open internet: every connection is served by the event loop
(a TLS handshake or a slow client never holds up another), with a handshake
timeout, a header timeout and a body read timeout plus a minimum body rate;
the token, the path and ``Content-Length`` are checked before a byte of the
body is read; the body size is limited by the declared length before reading
and while streaming; at most ``max_uploads`` bodies are received at once and
at most ``max_connections`` connections are kept. Every error is one line of
JSON (the parser's own 400s are one line of text) and never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import signal
import socket
import ssl
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bms_ai.core import cliargs

_SHA = re.compile(r"[0-9a-f]{64}")  # always fullmatch: "$" would let a trailing "\n" through
MAX_BODY = 1 << 30
log = logging.getLogger("bms_ai.ingest")


@dataclass
class Limits:
    """Timeouts and sizes that bound what one client can hold (seconds, bytes)."""

    max_body: int = MAX_BODY
    handshake_timeout_s: float = 10.0  # TLS handshake
    header_timeout_s: float = 15.0  # from connect (or the previous response) to complete request headers
    read_timeout_s: float = 30.0  # longest gap while reading a body
    min_rate_bps: float = 1024.0  # a body must arrive at least this fast on average (after read_timeout_s)
    max_uploads: int = 64  # bodies received at once; more wait up to queue_timeout_s, then 503
    queue_timeout_s: float = 30.0
    max_connections: int = 1024  # beyond this, new connections are closed at once
    linger_bytes: int = 16 << 20  # after refusing a request, discard at most this much of its body ...
    linger_s: float = 2.0  # ... for at most this long, so the client can read the answer; then close


@dataclass
class ServerStats:
    """What the server refused or cut, for tests and the listing."""

    connections: int = 0
    connections_refused: int = 0
    unauthorised: int = 0
    too_large: int = 0
    bad_requests: int = 0
    timeouts: int = 0
    over_capacity: int = 0
    client_errors: int = 0
    uploads_active: int = 0
    uploads_peak: int = 0
    body_bytes: int = 0
    discarded_bytes: int = 0


class IngestStore:
    """Content-addressed store; ``received`` counts every accepted PUT, ``duplicates`` those already stored."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        for p in (self.root / "tmp").iterdir():  # half-received uploads from a previous run
            p.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self.received = 0
        self.duplicates = 0
        self.rejected = 0

    def path(self, sha: str) -> Path:
        """Where the object with this hash is stored."""
        return self.root / "objects" / sha

    def begin(self, sha: str) -> Incoming:
        """A temp file that becomes the object if what is written hashes to ``sha``."""
        return Incoming(self, sha)

    def _store(self, inc: Incoming, meta: dict[str, str]) -> tuple[int, str]:
        digest = inc.hash.hexdigest()
        if digest != inc.sha:
            inc.tmp.unlink(missing_ok=True)
            with self._lock:
                self.rejected += 1
            return 400, f"sha256 mismatch: got {digest}"
        with self._lock:
            dst = self.path(inc.sha)
            if dst.exists():
                inc.tmp.unlink(missing_ok=True)
                self.duplicates += 1
                self.received += 1
                return 200, "duplicate"
            meta_doc = dict(meta, sha256=inc.sha, size=inc.size, received=time.time())
            (self.root / "objects" / f"{inc.sha}.json").write_text(json.dumps(meta_doc, sort_keys=True))
            os.replace(inc.tmp, dst)
            self.received += 1
            return 201, "created"

    def list(self) -> list[dict[str, Any]]:
        """Stored objects with their metadata."""
        out = []
        for p in sorted((self.root / "objects").iterdir()):
            if _SHA.fullmatch(p.name):
                meta_p = p.with_name(p.name + ".json")
                meta = json.loads(meta_p.read_text()) if meta_p.exists() else {}
                out.append({"sha256": p.name, "size": p.stat().st_size, **{k: v for k, v in meta.items()
                                                                             if k not in ("sha256", "size")}})
        return out


class Incoming:
    """One body being received: hashed and written as it arrives; nothing is left behind unless finished."""

    def __init__(self, store: IngestStore, sha: str) -> None:
        self.store = store
        self.sha = sha
        self.tmp = store.root / "tmp" / f"{sha}.{uuid.uuid4().hex}"
        self.hash = hashlib.sha256()
        self.size = 0
        self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish()/abort()

    def write(self, chunk: bytes) -> None:
        """Append a piece of the body."""
        self.hash.update(chunk)
        self._f.write(chunk)
        self.size += len(chunk)

    def finish(self, meta: dict[str, str]) -> tuple[int, str]:
        """fsync, check the hash and store (blocking: run it off the event loop)."""
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            return self.store._store(self, meta)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the partial body."""
        with contextlib.suppress(OSError):
            self._f.close()
        self.tmp.unlink(missing_ok=True)


def segment_name(name: str) -> str | None:
    """The object name a request asks to store (64 hex digits, lower-cased), or None.

    The name becomes a file name under ``objects/`` and ``tmp/``: only this form may pass,
    so no request can name a path outside the store.
    """
    sha = name.lower()
    return sha if _SHA.fullmatch(sha) else None


def bearer_ok(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` value (as aiohttp decodes it) is ``Bearer <token>``; no token = open server.

    Compared in constant time, so the answer time does not tell how much of a guess was right; encoded
    one-to-one (bytes aiohttp could not decode arrive as surrogates), so only the exact value matches.
    """
    if not token:
        return True
    got = (header or "").encode("utf-8", "surrogatepass")
    return hmac.compare_digest(got, f"Bearer {token}".encode("utf-8", "surrogatepass"))


def _one_line(text: object, limit: int = 200) -> str:
    """Whitespace (newlines included) collapsed, cut to ``limit``: errors and log lines stay one line."""
    return " ".join(str(text).split())[:limit]


class _OneLineLogger(logging.LoggerAdapter):
    """aiohttp's server logger with exceptions reduced to one counted line: bad input never logs a traceback."""

    def __init__(self, stats: ServerStats) -> None:
        super().__init__(log, {})
        self.stats = stats

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        exc = kwargs.pop("exc_info", None)
        if exc is not None:
            if level >= logging.WARNING:
                self.stats.client_errors += 1
                level = logging.WARNING
            if isinstance(exc, BaseException):  # its text quotes the client's bytes: an argument, never the format
                msg, args = f"{msg}: %s: %s", (*args, type(exc).__name__, _one_line(exc))
        kwargs.pop("stack_info", None)
        super().log(level, msg, *args, **kwargs)


def _json(code: int, doc: dict[str, Any], close: bool = False):  # noqa: ANN202 - aiohttp imported lazily
    from aiohttp import web

    resp = web.Response(status=code, text=json.dumps(doc), content_type="application/json")
    if close:
        resp.force_close()
    return resp


@functools.lru_cache(maxsize=1)
def _aiohttp_server_class() -> type:
    """aiohttp's low-level server whose parser errors (bad request line, headers) are one line of JSON too."""
    try:
        from aiohttp import web
    except ImportError as exc:
        raise RuntimeError("the ingest server needs aiohttp: pip install 'bms_ai[server]'") from exc

    class Handler(web.RequestHandler):
        def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                         message: str | None = None) -> Any:
            self.logger.debug("bad request from %s", request.remote, exc_info=exc)
            if request.writer.output_size > 0:
                raise ConnectionError("response already started")
            return _json(status, {"error": _one_line(message or exc or "bad request")}, close=True)

    class Server(web.Server):
        def __call__(self) -> Any:
            return Handler(self, loop=self._loop, **self._kwargs)

    return Server


class IngestApp:
    """The request handling: routing, authentication, limits, streaming into the store."""

    def __init__(self, store: IngestStore, token: str, limits: Limits, stats: ServerStats) -> None:
        self.store = store
        self.token = token
        self.limits = limits
        self.stats = stats
        self._slots: asyncio.Semaphore | None = None

    def _authorised(self, request: Any) -> bool:
        return bearer_ok(request.headers.get("Authorization"), self.token)

    async def handle(self, request: Any) -> Any:
        """Route one request; anything unexpected is a one-line 500, never a traceback."""
        try:
            return await self._route(request)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - the server keeps serving; the reason is logged in one line
            self.stats.client_errors += 1
            log.warning("internal error on %s %s: %s: %s", request.method, request.path[:200], type(exc).__name__, exc)
            return _json(500, {"error": f"internal error: {type(exc).__name__}"}, close=True)

    async def _route(self, request: Any) -> Any:
        path = request.path.rstrip("/")
        method = request.method
        if method in ("GET", "HEAD"):
            return await self._get(request, path)
        if method == "PUT":
            parts = path.strip("/").split("/")
            if len(parts) >= 2 and parts[-2] == "segments":
                return await self._put(request, parts[-1])
            return await self._refuse(request, 404, "PUT /segments/<sha256>")
        if method == "POST":
            if path.endswith("/segments"):
                return await self._put(request, request.headers.get("X-Content-SHA256", ""))
            return await self._refuse(request, 404, "POST /segments")
        return await self._refuse(request, 405, f"method {method[:20]} not allowed")

    async def _get(self, request: Any, path: str) -> Any:
        if path in ("/healthz", ""):
            return _json(200, {"ok": True})
        if not self._authorised(request):
            self.stats.unauthorised += 1
            return await self._refuse(request, 401, "bad or missing token")
        if path == "/segments":
            listing = await asyncio.get_running_loop().run_in_executor(None, self.store.list)
            return _json(200, {"segments": listing, "received": self.store.received,
                               "duplicates": self.store.duplicates, "rejected": self.store.rejected,
                               "server": asdict(self.stats)})
        return await self._refuse(request, 404, "not found")

    async def _refuse(self, request: Any, code: int, error: str) -> Any:
        """Answer before reading the body; then discard a bounded part of it so the client can read the answer."""
        resp = _json(code, {"error": error}, close=not request.content.is_eof())
        if request.content.is_eof():
            return resp
        await resp.prepare(request)
        await resp.write_eof()
        budget = min(self.limits.linger_bytes, request.content_length or self.limits.linger_bytes)
        end = time.monotonic() + self.limits.linger_s
        with contextlib.suppress(Exception):
            while budget > 0 and not request.content.is_eof():
                left = end - time.monotonic()
                if left <= 0:
                    break
                chunk = await asyncio.wait_for(request.content.read(min(budget, 1 << 16)), left)
                if not chunk:
                    break
                budget -= len(chunk)
                self.stats.discarded_bytes += len(chunk)
        return resp

    def _check_length(self, request: Any) -> tuple[int, str] | int:
        """The declared body length, or (status, error) when it is missing or too large."""
        if request.headers.get("Transfer-Encoding") or request.content_length is None:
            return 411, "Content-Length required"
        if request.content_length > self.limits.max_body:
            self.stats.too_large += 1
            return 413, f"body larger than {self.limits.max_body} bytes"
        return int(request.content_length)

    async def _put(self, request: Any, sha: str) -> Any:
        if not self._authorised(request):
            self.stats.unauthorised += 1
            return await self._refuse(request, 401, "bad or missing token")
        name = segment_name(sha)
        if name is None:
            self.stats.bad_requests += 1
            return await self._refuse(request, 400, "need sha256 (64 hex) in path or X-Content-SHA256")
        sha = name
        length = self._check_length(request)
        if isinstance(length, tuple):
            return await self._refuse(request, *length)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limits.max_uploads)
        try:
            await asyncio.wait_for(self._slots.acquire(), self.limits.queue_timeout_s)
        except asyncio.TimeoutError:
            self.stats.over_capacity += 1
            resp = await self._refuse(request, 503, "too many uploads at once, retry later")
            resp.headers["Retry-After"] = "5"
            return resp
        self.stats.uploads_active += 1
        self.stats.uploads_peak = max(self.stats.uploads_peak, self.stats.uploads_active)
        try:
            return await self._receive(request, sha, length)
        finally:
            self.stats.uploads_active -= 1
            self._slots.release()

    async def _receive(self, request: Any, sha: str, length: int) -> Any:
        meta = {k[6:].lower(): v for k, v in request.headers.items() if k.lower().startswith("x-bms-")}
        inc = self.store.begin(sha)
        done = False
        lim = self.limits
        deadline = time.monotonic() + lim.read_timeout_s + length / max(lim.min_rate_bps, 1.0)
        try:
            remaining = length
            while remaining > 0:
                wait = min(lim.read_timeout_s, deadline - time.monotonic())
                if wait <= 0:
                    raise asyncio.TimeoutError
                chunk = await asyncio.wait_for(request.content.read(min(1 << 16, remaining)), wait)
                if not chunk:
                    break
                remaining -= len(chunk)
                self.stats.body_bytes += len(chunk)
                inc.write(chunk)
            if remaining or not request.content.is_eof():
                self.stats.bad_requests += 1
                return _json(400, {"error": "body does not match Content-Length"}, close=True)
            code, msg = await asyncio.get_running_loop().run_in_executor(None, inc.finish, meta)
            done = True
            return _json(code, {"sha256": sha, "result": msg}, close=code >= 400)
        except asyncio.TimeoutError:
            self.stats.timeouts += 1
            return _json(408, {"error": "body not received in time"}, close=True)
        finally:
            if not done:
                inc.abort()


class _Refuser(asyncio.Protocol):
    """Stands in for a connection over ``max_connections``: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        transport.abort()  # type: ignore[attr-defined]


class IngestServer:
    """The HTTP(S) ingest server on an asyncio loop, in a thread (tests, bench) or the foreground (CLI)."""

    def __init__(self, root: str | os.PathLike[str], token: str = "", host: str = "127.0.0.1", port: int = 0,
                 certfile: str | None = None, keyfile: str | None = None, verbose: bool = False,
                 limits: Limits | None = None) -> None:
        self.store = IngestStore(root)
        self.limits = limits or Limits()
        self.stats = ServerStats()
        self.token = token
        self.verbose = verbose
        self._ssl: ssl.SSLContext | None = None
        if certfile:
            self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ssl.load_cert_chain(certfile, keyfile)
        self.scheme = "https" if self._ssl else "http"
        _aiohttp_server_class()  # a missing aiohttp is a one-line error here, not in the server thread
        self._sock = socket.create_server((host, port), backlog=512)  # bound now: the port is known at once
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: Any = None
        self._server: asyncio.AbstractServer | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        """Base URL for backends."""
        return f"{self.scheme}://{self._sock.getsockname()[0]}:{self.port}"

    def info(self) -> dict[str, Any]:
        """Server counters and the store's, in one dict."""
        return {**asdict(self.stats), "received": self.store.received, "duplicates": self.store.duplicates,
                "rejected": self.store.rejected}

    async def _startup(self) -> None:
        from aiohttp import web

        app = IngestApp(self.store, self.token, self.limits, self.stats)
        low = _aiohttp_server_class()(app.handle, keepalive_timeout=self.limits.header_timeout_s, lingering_time=0,
                         logger=_OneLineLogger(self.stats), access_log=log if self.verbose else None,
                         auto_decompress=False)
        self._runner = web.ServerRunner(low, handle_signals=False)
        await self._runner.setup()
        runner_server = self._runner.server
        limit = self.limits.max_connections

        def protocol() -> asyncio.Protocol:
            if len(runner_server.connections) >= limit:
                self.stats.connections_refused += 1
                return _Refuser()
            self.stats.connections += 1
            return runner_server()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            protocol, sock=self._sock, ssl=self._ssl,
            ssl_handshake_timeout=self.limits.handshake_timeout_s if self._ssl else None)

    async def _cleanup(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def _run_thread(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._startup())
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._cleanup())
            loop.close()

    def start(self) -> IngestServer:
        """Serve in a daemon thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self._run_thread, name="bms_ai-ingest", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._sock.close()

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._startup())
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, loop.stop)
            loop.run_forever()
        finally:
            loop.run_until_complete(self._cleanup())
            loop.close()
            self._sock.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`bms-ai ingest-server` arguments."""
    d = Limits()
    p.add_argument("--root", default="ingest_store", help="directory for received segments")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=cliargs.port, default=8080)
    p.add_argument("--token", default=None, help="bearer token (default: $BMS_AI_INGEST_TOKEN; empty = no auth)")
    p.add_argument("--token-file", default=None, help="read the bearer token from this file (keeps it out of ps)")
    p.add_argument("--certfile", default=None, help="TLS certificate (PEM) to serve HTTPS")
    p.add_argument("--keyfile", default=None, help="TLS private key (PEM)")
    p.add_argument("--max-body-mb", type=cliargs.positive_float, default=d.max_body / 2**20, help="largest accepted segment")
    p.add_argument("--max-uploads", type=int, default=d.max_uploads, help="bodies received at once")
    p.add_argument("--read-timeout-s", type=float, default=d.read_timeout_s, help="longest gap within a body")
    p.add_argument("-v", "--verbose", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Serve in the foreground until Ctrl-C or SIGTERM."""
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    else:
        token = args.token if args.token is not None else os.environ.get("BMS_AI_INGEST_TOKEN", "")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    limits = Limits(max_body=int(args.max_body_mb * 2**20), max_uploads=args.max_uploads,
                    read_timeout_s=args.read_timeout_s)
    srv = IngestServer(args.root, token, args.host, args.port, args.certfile, args.keyfile, args.verbose, limits)
    print(f"bms-ai ingest-server: {srv.url} storing in {Path(args.root).resolve()}"
          f"{'' if token else ' (no token: open to anyone who can reach it)'}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        srv.serve_forever()
    return 0
