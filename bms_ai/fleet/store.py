"""Object store of the fleet pipeline: one small interface over a local folder or S3-compatible storage.

Vehicles put their segments here, the Ray pipeline reads them and writes its
timelines, labels and rankings back. Keys are ``/``-separated paths
(``segments/<pseudonym>/<class>/<sha256>.mcap``); a put is atomic (readers see
the whole object or none), so a worker that dies mid-write leaves no torn file.
Picked by URL (``open_store``): a path or ``file://`` folder, or
``s3://bucket/prefix`` with an ``endpoint_url`` for any S3-compatible server.
Stores pickle as their URL and options, so Ray ships them to workers, which
reconnect there.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bms_ai.core.registry import Registry


class ObjectStore(ABC):
    """put / get / exists / list by prefix; keys are relative ``/`` paths."""

    url: str

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (replacing what was there)."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; KeyError when it does not exist."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, sorted (a streamed listing, never the whole bucket at once)."""

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Store a local file (Parquet written by a library that wants a path)."""
        self.put(key, Path(path).read_bytes())

    def __reduce__(self) -> tuple[Any, tuple]:
        """Pickled as how to reopen it (Ray workers reconnect; clients and sockets never travel)."""
        return (_reopen, (self.url, self._options()))

    def _options(self) -> dict[str, Any]:
        return {}


def _reopen(url: str, options: dict[str, Any]) -> ObjectStore:
    return open_store(url, **options)


def check_key(key: str) -> str:
    """A relative key without ``..`` or empty parts: a store never writes outside its root."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"object key must be a relative path without '..' or empty parts, got {key!r}")
    return key


STORES: Registry[type[ObjectStore]] = Registry("object store")


@STORES.register("file", "a local or mounted folder")
class LocalStore(ObjectStore):
    """A folder; atomic put = write a temp file beside the target, then rename."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        """Temp file in the same folder, then ``os.replace``: readers never see half an object."""
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def get(self, key: str) -> bytes:
        """The file's bytes; KeyError if missing."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        """A regular file at the key."""
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        """Regular files under the prefix (temp files of puts in flight are skipped), sorted."""
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in sorted(filenames):
                if name.startswith(".tmp-"):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    yield key


@STORES.register("s3", "S3-compatible object storage (boto3)")
class S3Store(ObjectStore):
    """A bucket and key prefix on any S3-compatible endpoint; a PUT is atomic by S3's own semantics."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str = "us-east-1",
                 access_key: str | None = None, secret_key: str | None = None, timeout_s: float = 30.0) -> None:
        import boto3  # optional dependency (extra "fleet"), imported when an s3:// store is opened
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        self._opts = {"endpoint_url": endpoint_url, "region": region, "access_key": access_key,
                      "secret_key": secret_key, "timeout_s": timeout_s}
        self._s3 = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region, aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 3}))

    def _options(self) -> dict[str, Any]:
        return dict(self._opts)

    def put(self, key: str, data: bytes) -> None:
        """One PUT (S3 objects appear whole or not at all)."""
        self._s3.put_object(Bucket=self.bucket, Key=self.prefix + check_key(key), Body=data)

    def get(self, key: str) -> bytes:
        """The object's body; KeyError if missing."""
        from botocore.exceptions import ClientError

        try:
            return self._s3.get_object(Bucket=self.bucket, Key=self.prefix + check_key(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise KeyError(key) from None
            raise

    def exists(self, key: str) -> bool:
        """HEAD finds the key."""
        from botocore.exceptions import ClientError

        try:
            self._s3.head_object(Bucket=self.bucket, Key=self.prefix + check_key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, prefix: str = "") -> Iterator[str]:
        """Paged ListObjectsV2 (S3 returns keys sorted)."""
        pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.prefix):]


def open_store(url: str, endpoint_url: str | None = None, **options: Any) -> ObjectStore:
    """The store a URL names: a path or ``file://`` folder, or ``s3://bucket/prefix`` (+ ``endpoint_url``).

    S3 credentials come from the usual boto3 chain (environment, config files) unless given.
    An unknown scheme is a one-line ValueError naming the registered ones.
    """
    u = urllib.parse.urlsplit(str(url))
    if u.scheme in ("", "file"):
        return STORES.get("file")(urllib.parse.unquote(u.path) if u.scheme else str(url))
    if u.scheme == "s3":
        if not u.netloc:
            raise ValueError(f"s3 store URL needs a bucket: s3://bucket/prefix, got {url!r}")
        return STORES.get("s3")(u.netloc, u.path.lstrip("/"), endpoint_url=endpoint_url, **options)
    raise ValueError(f"store URL scheme {u.scheme!r} unknown; use a path, file://, or one of {STORES.names()}")
