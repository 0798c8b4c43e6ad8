"""Upload backends: one small interface, implementations picked by name from config.

Like python-can's interfaces: ``make_backend({"kind": "http", ...})`` looks the
kind up in the ``BACKENDS`` registry; adding one is a ``Backend`` subclass
registered with ``@BACKENDS.register("name")``.
Backends raise ``UploadError`` with ``transient`` telling the uploader whether
retrying can help (network down, 5xx) or not without a fix (bad token).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import ssl
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, BinaryIO

from bms_ai.core.registry import Registry
from bms_ai.uplink.spool import Segment


class UploadError(Exception):
    """An upload that did not happen.

    ``transient``: retrying later can help (network, 5xx, 429); ``auth``: the credentials are refused (all
    segments wait for a fix); ``permanent``: the server will never take *this* segment (e.g. 413), so it is
    quarantined and the ones behind it go on.
    """

    def __init__(self, message: str, transient: bool = True, auth: bool = False, permanent: bool = False) -> None:
        super().__init__(message)
        self.transient = transient and not permanent
        self.auth = auth
        self.permanent = permanent


# 4xx answers that will not change on retry for this segment; 400 (hash mismatch in flight), 408, 409, 425 and
# 429 are retried, 401/403 are credentials.
PERMANENT_HTTP = frozenset({404, 405, 410, 411, 413, 414, 415, 422})


class Throttle:
    """Token bucket in bytes/s shared by all uploads (0 = unlimited); bursts of ``burst_s`` worth."""

    def __init__(self, rate_bps: float = 0.0, burst_s: float = 0.25) -> None:
        self.rate = float(rate_bps)
        self.burst = self.rate * burst_s
        self._tokens = self.burst
        self._t = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        """Wait until ``n`` bytes may be sent."""
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
            self._t = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


def read_chunks(f: BinaryIO, throttle: Throttle, chunk: int = 64 << 10) -> Iterator[bytes]:
    """The file in chunks, each paid for in the throttle before it is sent."""
    while data := f.read(chunk):
        throttle.take(len(data))
        yield data


class Backend(ABC):
    """Puts one segment somewhere durable; must be idempotent by content hash."""

    @abstractmethod
    def upload(self, seg: Segment, f: BinaryIO, throttle: Throttle, headers: dict[str, str]) -> str:
        """Upload the open file; return a short description ('created', 'duplicate', ...)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections (optional)."""
        pass


BACKENDS: Registry[type[Backend]] = Registry("upload backend")


def make_backend(config: dict[str, Any]) -> Backend:
    """The backend a config section names (``kind``), built from the section's other keys.

    An unknown kind is a one-line ValueError listing the registered kinds.
    """
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    return BACKENDS.get(str(kind))(**cfg)


@BACKENDS.register("http", "HTTP(S) PUT to an ingest endpoint")
class HttpBackend(Backend):
    """PUT to an ingest endpoint (``bms-ai ingest-server`` or compatible): bearer token, sha256 idempotency key."""

    def __init__(self, url: str, token: str = "", ca_file: str | None = None, timeout_s: float = 30.0,
                 verify_tls: bool = True) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"ingest url must be http(s)://host[:port]/path, got {url!r}")
        self.url = url
        # plain http only because the config says so; say that token and data travel unencrypted
        self.insecure = "" if u.scheme == "https" else f"plain http to {u.netloc}: token and data unencrypted"
        if self.insecure:
            logging.getLogger("bms_ai.uplink").warning("%s (use https:// in backend.url)", self.insecure)
        self._u = u
        self.token = token
        self.timeout_s = float(timeout_s)
        self._ctx: ssl.SSLContext | None = None
        if u.scheme == "https":
            self._ctx = ssl.create_default_context(cafile=ca_file)  # verifies chain and hostname
            if not verify_tls:  # only for a lab bench; config must say so explicitly
                self._ctx.check_hostname = False
                self._ctx.verify_mode = ssl.CERT_NONE

    def _conn(self) -> http.client.HTTPConnection:
        host, port = self._u.hostname or "", self._u.port
        if self._ctx is not None:
            return http.client.HTTPSConnection(host, port, timeout=self.timeout_s, context=self._ctx)
        return http.client.HTTPConnection(host, port, timeout=self.timeout_s)

    def upload(self, seg: Segment, f: BinaryIO, throttle: Throttle, headers: dict[str, str]) -> str:
        """PUT the segment; 201 'created', 200 'duplicate'; 401/403 are not transient."""
        path = self._u.path.rstrip("/") + "/segments/" + seg.sha256
        h = {"Content-Type": "application/octet-stream", "Content-Length": str(seg.size),
             "Idempotency-Key": seg.sha256, "X-Content-SHA256": seg.sha256, **headers}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        conn = self._conn()
        try:
            conn.request("PUT", path, body=read_chunks(f, throttle), headers=h, encode_chunked=False)
            resp = conn.getresponse()
            body = resp.read(4096).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            raise UploadError(f"{type(exc).__name__}: {exc}", transient=True) from exc
        finally:
            conn.close()
        if resp.status in (200, 201):
            return "created" if resp.status == 201 else "duplicate"
        if resp.status in (401, 403):
            raise UploadError(f"HTTP {resp.status}: {body[:200]}", transient=False, auth=True)
        if resp.status in PERMANENT_HTTP:
            raise UploadError(f"HTTP {resp.status}: {body[:200]}", permanent=True)
        # 400 = hash mismatch in flight (the file was verified before sending), 5xx, 429: retry later
        raise UploadError(f"HTTP {resp.status}: {body[:200]}", transient=True)


@BACKENDS.register("s3", "S3-compatible object storage (boto3)")
class S3Backend(Backend):
    """S3-compatible object storage via boto3; key = prefix/class/sha256.ext; skip if already there."""

    def __init__(self, bucket: str, prefix: str = "bms_ai/", endpoint_url: str | None = None,
                 region: str = "us-east-1", access_key: str | None = None, secret_key: str | None = None,
                 ca_file: str | None = None, verify_tls: bool = True, timeout_s: float = 30.0) -> None:
        import boto3  # optional dependency, imported when this backend is chosen
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix
        verify: bool | str = ca_file if ca_file else verify_tls
        self._s3 = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region, aws_access_key_id=access_key,
            aws_secret_access_key=secret_key, verify=verify,
            config=Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 1}))

    def key(self, seg: Segment, vehicle: str = "") -> str:
        """<prefix>[<vehicle pseudonym>/]<class>/<sha256>.<ext>: one object per content hash."""
        name = seg.path.name.split(".")
        ext = ".".join(name[2:]) or "bin"
        return f"{self.prefix}{vehicle + '/' if vehicle else ''}{seg.cls}/{name[0]}.{ext}"

    def upload(self, seg: Segment, f: BinaryIO, throttle: Throttle, headers: dict[str, str]) -> str:
        """Put the object unless its key exists ('duplicate'); access errors are not transient."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = self.key(seg, headers.get("X-BMS-Vehicle", ""))
        meta = {k.lower().removeprefix("x-bms-"): v for k, v in headers.items() if k.lower().startswith("x-bms-")}
        try:
            try:
                self._s3.head_object(Bucket=self.bucket, Key=key)
                return "duplicate"
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                    raise
            data = b"".join(read_chunks(f, throttle))
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=data, Metadata={"sha256": seg.sha256, **meta},
                                ChecksumSHA256=base64.b64encode(bytes.fromhex(seg.sha256)).decode())
            return "created"
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            auth = code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")
            permanent = code in ("EntityTooLarge", "KeyTooLongError", "InvalidArgument", "413")
            raise UploadError(f"S3 {code}: {exc}", transient=not auth, auth=auth, permanent=permanent) from exc
        except (BotoCoreError, OSError) as exc:
            raise UploadError(f"S3 {type(exc).__name__}: {exc}", transient=True) from exc


@BACKENDS.register("directory", "copy into a local or mounted directory")
class DirectoryBackend(Backend):
    """Copy into a local/mounted directory (sneakernet, NFS); same idempotency by hash."""

    def __init__(self, path: str) -> None:
        from pathlib import Path
        self.path = Path(path)

    def upload(self, seg: Segment, f: BinaryIO, throttle: Throttle, headers: dict[str, str]) -> str:
        """Copy via a temp file and rename, so the target never holds a partial segment."""
        import os
        self.path.mkdir(parents=True, exist_ok=True)
        dst = self.path / seg.path.name
        if dst.exists():
            return "duplicate"
        tmp = dst.with_suffix(dst.suffix + ".tmp")
        with open(tmp, "wb") as out:
            for chunk in read_chunks(f, throttle):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
        (self.path / (seg.path.name + ".json")).write_text(json.dumps(headers))
        return "created"
