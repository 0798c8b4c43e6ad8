"""Signed model distribution, publisher side: a TUF repository of ONNX models on disk.

Layout of ``repo_dir`` (served as it is by any static HTTP server):

- ``metadata/``: ``N.root.json`` (every root version, for key rotation),
  ``N.targets.json``, ``N.snapshot.json`` (consistent snapshots: a client
  always reads one coherent state even while a publish is under way) and
  ``timestamp.json``; unversioned ``root.json``, ``targets.json``,
  ``snapshot.json`` hold the current version for the publisher itself.
- ``targets/``: ``<sha256>.<target path>``, content-addressed target files.

Targets of a model: the ONNX file (``<file>``) and its manifest entry as the
vehicle's model directory expects it (``<file>.json``), each with custom
target info ``{"bms_ai": {"kind", "name", "task", "chemistry", "version"}}``;
plus ``models.json``, a signed index of every published model, which is how a
vehicle learns what exists without private client APIs.

One ed25519 key per top-level role (root, targets, snapshot, timestamp), each
a PKCS#8 PEM file ``<role>.pem`` in a key directory of mode 0700, files 0600.
Keys are read from those files only; they are never logged, printed or passed
as parameters, and a key file that others can read is refused.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer
from tuf.repository import Repository

from bms_ai.core.files import load_json, read_bounded, sha256_file
from bms_ai.models.manifest import ModelEntry

ROLES = ("root", "targets", "snapshot", "timestamp")
# How long each role's signature is valid; the timestamp is short so a frozen mirror is noticed within a day
# (`bms-ai fleet tuf refresh` re-signs it, e.g. from cron), root long because re-signing it needs the offline key.
DEFAULT_EXPIRY: dict[str, timedelta] = {"root": timedelta(days=365), "targets": timedelta(days=90),
                                        "snapshot": timedelta(days=7), "timestamp": timedelta(days=1)}
METADATA_DIR = "metadata"
TARGETS_DIR = "targets"
INDEX = "models.json"          # target: the signed list of published models
CUSTOM = "bms_ai"              # key of our custom target info
INDEX_SCHEMA = 1
MAX_TARGET_BYTES = 64 << 20    # a model is tens of KB; the vehicle refuses anything above its own bound too
MAX_KEY_BYTES = 16 << 10


class TufRepoError(ValueError):
    """A repository or key problem, as one line naming the file or role (never key material)."""


# ----------------------------------------------------------------------------- keys

def key_path(key_dir: str | os.PathLike, role: str) -> Path:
    """Where the private key of ``role`` lives."""
    return Path(key_dir) / f"{role}.pem"


def generate_keys(key_dir: str | os.PathLike) -> dict[str, CryptoSigner]:
    """New ed25519 signers for every role, written as 0600 files into a 0700 ``key_dir``.

    Existing key files are never overwritten: losing a root key locks every
    vehicle out of future updates.
    """
    kdir = Path(key_dir)
    kdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(kdir, 0o700)
    taken = [key_path(kdir, r).name for r in ROLES if key_path(kdir, r).exists()]
    if taken:
        raise TufRepoError(f"{kdir}: key file(s) {', '.join(taken)} exist; refusing to overwrite keys")
    signers = {}
    for role in ROLES:
        signer = CryptoSigner.generate_ed25519()
        fd = os.open(key_path(kdir, role), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(signer.private_bytes)
        signers[role] = signer
    return signers


def load_signer(key_dir: str | os.PathLike, role: str) -> CryptoSigner:
    """The signer of ``role`` from its key file; a missing, unprotected or malformed file is a TufRepoError."""
    path = key_path(key_dir, role)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise TufRepoError(f"{path}: {role} key not readable: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TufRepoError(f"{path}: {role} key is accessible by others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
    raw = read_bounded(path, f"{role} key", MAX_KEY_BYTES, TufRepoError, str(path))
    try:
        private = load_pem_private_key(raw, None)
    except (ValueError, TypeError):  # the library's message could quote the file: say only what is wrong
        raise TufRepoError(f"{path}: not an unencrypted PKCS#8 PEM private key") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise TufRepoError(f"{path}: {role} key must be ed25519, got {type(private).__name__}")
    return CryptoSigner(private)


# ----------------------------------------------------------------------------- files

def _atomic_write(path: Path, data: bytes) -> None:
    """Readers (the HTTP server, the publisher itself) see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _expiry(delta: timedelta) -> datetime:
    return (datetime.now(timezone.utc) + delta).replace(microsecond=0)


@dataclass(frozen=True)
class PublishedModel:
    """One row of the signed index: a model a vehicle may install."""

    name: str
    task: str
    chemistry: str
    version: int
    file: str           # target path of the ONNX file
    entry: str          # target path of its manifest entry (``<file>.json``)
    sha256: str

    @property
    def key(self) -> tuple[str, str]:
        """(task, chemistry): the model slot it competes for."""
        return (self.task, self.chemistry)

    def to_dict(self) -> dict[str, Any]:
        """JSON form in the index."""
        return {"name": self.name, "task": self.task, "chemistry": self.chemistry, "version": self.version,
                "file": self.file, "entry": self.entry, "sha256": self.sha256}


# ----------------------------------------------------------------------------- the repository

def _custom(tf: TargetFile) -> dict[str, Any]:
    """Our custom info of a target ({} for targets someone else added)."""
    c = tf.custom.get(CUSTOM) if isinstance(tf.custom, dict) else None
    return c if isinstance(c, dict) else {}


def _row(path: str, tf: TargetFile) -> PublishedModel | None:
    c = _custom(tf)
    if c.get("kind") != "model":
        return None
    return PublishedModel(c["name"], c["task"], c["chemistry"], int(c["version"]), path, c["entry"],
                          tf.hashes["sha256"])


class TufPublisher(Repository):
    """A TUF repository on disk that publishes models; python-tuf's ``Repository`` does snapshot/timestamp.

    Every edit bumps the role's version, sets its expiry and signs it with the
    role's key; :meth:`publish` adds a model's two targets and a new index,
    then a new snapshot and timestamp, so a vehicle sees all of it or none.
    """

    def __init__(self, repo_dir: str | os.PathLike, key_dir: str | os.PathLike,
                 expiry: Mapping[str, timedelta] | None = None) -> None:
        self.repo_dir = Path(repo_dir)
        self.key_dir = Path(key_dir)
        self.expiry = {**DEFAULT_EXPIRY, **(expiry or {})}
        self._signers: dict[str, Any] = {}

    @property
    def metadata_dir(self) -> Path:
        """Served at ``<url>/metadata/``."""
        return self.repo_dir / METADATA_DIR

    @property
    def targets_dir(self) -> Path:
        """Served at ``<url>/targets/``."""
        return self.repo_dir / TARGETS_DIR

    # -- setup

    @classmethod
    def init(cls, repo_dir: str | os.PathLike, key_dir: str | os.PathLike,
             expiry: Mapping[str, timedelta] | None = None) -> TufPublisher:
        """Create the keys and version 1 of every role (root lists one key per role, threshold 1)."""
        pub = cls(repo_dir, key_dir, expiry)
        if (pub.metadata_dir / "root.json").exists():
            raise TufRepoError(f"{pub.metadata_dir}: a repository exists here already")
        pub._signers = generate_keys(key_dir)
        with pub.edit_root() as root:
            for role in ROLES:
                root.add_key(pub._signers[role].public_key, role)
        with pub.edit_targets() as targets:
            targets.targets.clear()
        pub.do_snapshot(force=True)
        pub.do_timestamp(force=True)
        return pub

    def signer(self, role: str) -> CryptoSigner:
        """The role's signer, loaded once; it must be a key that root lists for the role."""
        if role not in self._signers:
            signer = load_signer(self.key_dir, role)
            root = self.root()
            if signer.public_key.keyid not in root.roles[role].keyids:
                raise TufRepoError(f"{key_path(self.key_dir, role)}: not a {role} key of this repository's root")
            self._signers[role] = signer
        return self._signers[role]

    # -- storage (python-tuf Repository interface)

    def open(self, role: str) -> Metadata:
        """The current metadata of ``role`` (version 0 of a new one when there is none yet)."""
        path = self.metadata_dir / f"{role}.json"
        if not path.exists():
            md = Metadata({"root": Root, "targets": Targets, "snapshot": Snapshot, "timestamp": Timestamp}[role]())
            md.signed.version = 0  # close() bumps it to 1
            return md
        try:
            return Metadata.from_bytes(read_bounded(path, f"{role} metadata", MAX_TARGET_BYTES, TufRepoError,
                                                    str(path)))
        except TufRepoError:
            raise
        except Exception as exc:  # noqa: BLE001  (the deserializer raises several types)
            raise TufRepoError(f"{path}: not TUF {role} metadata: {type(exc).__name__}: {exc}") from None

    def close(self, role: str, md: Metadata) -> None:
        """Bump version, set expiry, sign with the role's key and write (versioned file first)."""
        md.signed.version += 1
        md.signed.expires = _expiry(self.expiry[role])
        md.signatures.clear()
        md.sign(self.signer(role), append=True)
        data = md.to_bytes(JSONSerializer(compact=False))
        if role != "timestamp":
            _atomic_write(self.metadata_dir / f"{md.signed.version}.{role}.json", data)
        _atomic_write(self.metadata_dir / f"{role}.json", data)

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        """What snapshot lists: the current targets version."""
        return {"targets.json": MetaFile(self.targets().version)}

    @property
    def snapshot_info(self) -> MetaFile:
        """What timestamp lists: the current snapshot version, length and hash."""
        data = (self.metadata_dir / "snapshot.json").read_bytes()
        return MetaFile.from_data(self.snapshot().version, data, ["sha256"])

    # -- publishing

    def published(self) -> list[PublishedModel]:
        """Every model the targets metadata lists, by slot and version."""
        rows = [r for path, tf in self.targets().targets.items() if (r := _row(path, tf)) is not None]
        return sorted(rows, key=lambda r: (r.task, r.chemistry, r.version))

    def publish(self, model_file: str | os.PathLike, entry: ModelEntry | None = None) -> PublishedModel | None:
        """Sign and publish one model version; None when exactly this version is published already.

        ``entry`` defaults to the sidecar ``<model_file>.json``. The file must
        match the entry (name, sha256) and the version must be newer than
        every published one of its (task, chemistry): vehicles never go back.
        """
        model_file = Path(model_file)
        if entry is None:
            entry = ModelEntry.from_dict(load_json(Path(f"{model_file}.json"), "model entry"), f"{model_file.name}.json")
        self._check_model(model_file, entry)
        slot = [r for r in self.published() if r.key == entry.key]
        same = next((r for r in slot if r.version == entry.version), None)
        if same is not None and same.sha256 == entry.sha256 and same.file == entry.file:
            return None
        newest = max((r.version for r in slot), default=-1)
        if entry.version <= newest:
            raise TufRepoError(f"{entry.task}/{entry.chemistry}: version {entry.version} is not newer than the "
                               f"published version {newest}")
        info = {"name": entry.name, "task": entry.task, "chemistry": entry.chemistry, "version": entry.version,
                "entry": f"{entry.file}.json"}
        entry_bytes = (json.dumps(entry.to_dict(), indent=1) + "\n").encode()
        with self.edit_targets() as targets:
            self._add_target(targets, entry.file, model_file.read_bytes(), {"kind": "model", **info})
            self._add_target(targets, f"{entry.file}.json", entry_bytes, {"kind": "entry", **info})
            self._add_index(targets)
        self.do_snapshot()
        self.do_timestamp()
        return next(r for r in self.published() if r.key == entry.key and r.version == entry.version)

    @staticmethod
    def _check_model(model_file: Path, entry: ModelEntry) -> None:
        if "/" in entry.file or entry.file != model_file.name:
            raise TufRepoError(f"{model_file.name}: the entry names file {entry.file!r}; publish that file")
        if entry.file == INDEX or not entry.file.endswith(".onnx"):
            raise TufRepoError(f"{model_file.name}: a model file name ends in .onnx")
        try:
            size = model_file.stat().st_size
        except OSError as exc:
            raise TufRepoError(f"{model_file}: {exc.strerror or exc}") from None
        if size > MAX_TARGET_BYTES:
            raise TufRepoError(f"{model_file.name}: {size} bytes, more than {MAX_TARGET_BYTES}")
        digest = sha256_file(model_file)
        if digest != entry.sha256:
            raise TufRepoError(f"{model_file.name}: sha256 {digest[:12]} differs from its entry's {entry.sha256[:12]}; "
                               "refusing to sign a model its manifest does not describe")

    def _add_target(self, targets: Targets, path: str, data: bytes, custom: dict[str, Any]) -> None:
        """Store the content-addressed file, then list it (with our custom info) in ``targets``."""
        tf = TargetFile.from_data(path, data, ["sha256"])
        tf.unrecognized_fields["custom"] = {CUSTOM: custom}
        _atomic_write(self.targets_dir / f"{tf.hashes['sha256']}.{path}", data)
        targets.targets[path] = tf

    def _add_index(self, targets: Targets) -> None:
        rows = sorted((r for path, tf in targets.targets.items() if (r := _row(path, tf)) is not None),
                      key=lambda r: (r.task, r.chemistry, r.version))
        doc = {"schema": INDEX_SCHEMA, "models": [r.to_dict() for r in rows]}
        self._add_target(targets, INDEX, (json.dumps(doc, indent=1) + "\n").encode(), {"kind": "index"})

    def refresh(self) -> int:
        """Re-sign snapshot and timestamp with fresh expiries (run well within the timestamp's lifetime).

        Returns the new timestamp version.
        """
        self.do_snapshot(force=True)
        self.do_timestamp(force=True)
        return self.timestamp().version

    def trusted_root(self) -> Path:
        """Version 1 of root: the file to ship on every vehicle as its trust anchor."""
        return self.metadata_dir / "1.root.json"


# ----------------------------------------------------------------------------- serving

def make_server(repo_dir: str | os.PathLike, port: int = 8080, host: str = "127.0.0.1") -> Any:
    """A plain threaded HTTP server for ``repo_dir`` (static files; TUF needs nothing else); not started."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base class's name)
            """Quiet: a vehicle fleet polling would flood the log."""

    root = Path(repo_dir)
    if not (root / METADATA_DIR / "root.json").is_file():
        raise TufRepoError(f"{root}: not a repository (no {METADATA_DIR}/root.json); run `bms-ai fleet tuf init`")
    server = ThreadingHTTPServer((host, port), functools.partial(Handler, directory=str(root)))
    server.daemon_threads = True
    return server
