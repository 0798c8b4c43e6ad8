"""`bms-ai ingest-server`: reference cloud-side ingest for uploaded segments.

PUT /segments/<sha256> (or POST /segments with X-Content-SHA256): bearer token
checked in constant time, body streamed to a temp file while hashing, stored as
``<sha256>`` only if the hash matches. Idempotent: the same content twice is
one copy (201 first time, 200 after). GET /segments lists what is stored.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_SHA = re.compile(r"^[0-9a-f]{64}$")
MAX_BODY = 1 << 30


class IngestStore:
    """Content-addressed store; ``received`` counts every accepted PUT, ``stored`` unique copies."""

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

    def put(self, sha: str, stream: Any, length: int, meta: dict[str, str]) -> tuple[int, str]:
        """Store ``length`` bytes from ``stream`` if they hash to ``sha``: (HTTP status, result)."""
        tmp = self.root / "tmp" / f"{sha}.{uuid.uuid4().hex}"
        h = hashlib.sha256()
        remaining = length
        try:
            with open(tmp, "wb") as f:
                while remaining > 0:
                    chunk = stream.read(min(1 << 20, remaining))
                    if not chunk:
                        break
                    h.update(chunk)
                    f.write(chunk)
                    remaining -= len(chunk)
                f.flush()
                os.fsync(f.fileno())
        except OSError:  # client vanished mid-body (e.g. killed uploader): keep nothing
            tmp.unlink(missing_ok=True)
            raise
        if remaining:
            tmp.unlink(missing_ok=True)
            return 400, "body shorter than Content-Length"
        if h.hexdigest() != sha:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self.rejected += 1
            return 400, f"sha256 mismatch: got {h.hexdigest()}"
        with self._lock:
            dst = self.path(sha)
            if dst.exists():
                tmp.unlink(missing_ok=True)
                self.duplicates += 1
                self.received += 1
                return 200, "duplicate"
            meta_doc = dict(meta, sha256=sha, size=length, received=time.time())
            (self.root / "objects" / f"{sha}.json").write_text(json.dumps(meta_doc, sort_keys=True))
            os.replace(tmp, dst)
            self.received += 1
            return 201, "created"

    def list(self) -> list[dict[str, Any]]:
        """Stored objects with their metadata."""
        out = []
        for p in sorted((self.root / "objects").iterdir()):
            if _SHA.match(p.name):
                meta_p = p.with_name(p.name + ".json")
                meta = json.loads(meta_p.read_text()) if meta_p.exists() else {}
                out.append({"sha256": p.name, "size": p.stat().st_size, **{k: v for k, v in meta.items()
                                                                             if k not in ("sha256", "size")}})
        return out


class IngestHandler(BaseHTTPRequestHandler):
    """One HTTP request against ``store`` (set per server by :func:`make_handler`)."""

    protocol_version = "HTTP/1.1"
    server_version = "bms-ai-ingest/1"
    store: IngestStore
    token: str = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
        """Access log only with ``--verbose``."""
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    def _send(self, code: int, doc: Any) -> None:
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, code: int, error: str) -> None:
        """Answer without reading the body's content (it is drained, so the connection stays usable)."""
        self._drain()
        self._send(code, {"error": error})

    def _authorised(self) -> bool:
        if not self.token:
            return True
        got = self.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode())

    def _drain(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        while n > 0:
            c = self.rfile.read(min(n, 1 << 20))
            if not c:
                break
            n -= len(c)

    def do_GET(self) -> None:  # noqa: N802
        """/healthz without a token; /segments lists what is stored."""
        if self.path.rstrip("/") in ("/healthz", ""):
            self._send(200, {"ok": True})
        elif not self._authorised():
            self._send(401, {"error": "bad or missing token"})
        elif self.path.rstrip("/") == "/segments":
            self._send(200, {"segments": self.store.list(), "received": self.store.received,
                             "duplicates": self.store.duplicates, "rejected": self.store.rejected})
        else:
            self._send(404, {"error": "not found"})

    def do_PUT(self) -> None:  # noqa: N802
        """PUT /segments/<sha256>."""
        parts = self.path.strip("/").split("/")
        if len(parts) >= 2 and parts[-2] == "segments":
            self._put(parts[-1])
        else:
            self._refuse(404, "PUT /segments/<sha256>")

    def do_POST(self) -> None:  # noqa: N802
        """POST /segments with the hash in X-Content-SHA256."""
        if self.path.rstrip("/").endswith("/segments"):
            self._put(self.headers.get("X-Content-SHA256", ""))
        else:
            self._refuse(404, "POST /segments")

    def _body_length(self) -> int | None:
        """Content-Length if usable; otherwise answers 411/413, closes the connection and returns None."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            code, error = 411, "Content-Length required"
        else:
            if 0 <= length <= MAX_BODY:
                return length
            code, error = 413, "too large"
        self._send(code, {"error": error})
        self.close_connection = True
        return None

    def _put(self, sha: str) -> None:
        if not self._authorised():
            self._refuse(401, "bad or missing token")
            return
        sha = sha.lower()
        if not _SHA.match(sha):
            self._refuse(400, "need sha256 (64 hex) in path or X-Content-SHA256")
            return
        length = self._body_length()
        if length is None:
            return
        meta = {k[6:].lower(): v for k, v in self.headers.items() if k.lower().startswith("x-bms-")}
        try:
            code, msg = self.store.put(sha, self.rfile, length, meta)
        except OSError:
            self.close_connection = True
            return
        if code == 400:
            self.close_connection = True  # body may be partly unread
        self._send(code, {"sha256": sha, "result": msg})


def make_handler(store: IngestStore, token: str) -> type[BaseHTTPRequestHandler]:
    """A handler class bound to one store and token (http.server builds one handler per request)."""
    return type("Handler", (IngestHandler,), {"store": store, "token": token})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    client_errors = 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that vanished mid-request (killed uploader, dropped link) is routine: count, stay quiet."""
        import sys
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, ssl.SSLError)):
            self.client_errors += 1
            return
        super().handle_error(request, client_address)


class IngestServer:
    """Runs the HTTP(S) server in a thread (tests, bench) or in the foreground (CLI)."""

    def __init__(self, root: str | os.PathLike[str], token: str = "", host: str = "127.0.0.1", port: int = 0,
                 certfile: str | None = None, keyfile: str | None = None, verbose: bool = False) -> None:
        self.store = IngestStore(root)
        self.httpd = _Server((host, port), make_handler(self.store, token))
        self.httpd.verbose = verbose  # type: ignore[attr-defined]
        self.scheme = "http"
        if certfile:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certfile, keyfile)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL for backends."""
        return f"{self.scheme}://{self.httpd.server_address[0]}:{self.port}"

    def start(self) -> IngestServer:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`bms-ai ingest-server` arguments."""
    p.add_argument("--root", default="ingest_store", help="directory for received segments")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--token", default=None, help="bearer token (default: $BMS_AI_INGEST_TOKEN; empty = no auth)")
    p.add_argument("--certfile", default=None, help="TLS certificate (PEM) to serve HTTPS")
    p.add_argument("--keyfile", default=None, help="TLS private key (PEM)")
    p.add_argument("-v", "--verbose", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Serve in the foreground until Ctrl-C."""
    token = args.token if args.token is not None else os.environ.get("BMS_AI_INGEST_TOKEN", "")
    srv = IngestServer(args.root, token, args.host, args.port, args.certfile, args.keyfile, args.verbose)
    print(f"bms-ai ingest-server: {srv.url} storing in {Path(args.root).resolve()}"
          f"{'' if token else ' (no token: open to anyone who can reach it)'}", flush=True)
    try:
        srv.httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        srv.httpd.server_close()
    return 0
