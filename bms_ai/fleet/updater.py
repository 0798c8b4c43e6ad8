"""Signed model distribution, vehicle side: fetch newer models through TUF and install them for hot reload.

One :meth:`ModelUpdater.poll` refreshes the TUF metadata from the repository
(python-tuf's ngclient checks signatures and thresholds, expiry, version
rollback, lengths and hashes against the vehicle's trusted root and its
metadata cache), reads the signed index ``models.json``, and for each
(task, chemistry) whose newest published version is newer than what the model
directory holds, downloads the ONNX file and its manifest entry, checks they
agree with each other and with the signed target info, and installs them the
way the estimator expects a drop-in: the ``.onnx`` first, then
``<file>.onnx.json``, each written to a temporary name and moved into place
with ``os.replace``. ``ModelRegistry.poll()`` then validates and swaps it in.

Nothing here raises into the caller: every failure (unreachable server,
tampered target, wrong signature, expired metadata, rollback, a disk error)
is a counted rejection with a one-line reason, and the installed models stay.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

from bms_ai.core.files import read_bounded
from bms_ai.core.levels import ERROR, OK, WARN
from bms_ai.estimation.status import CheckStatus
from bms_ai.fleet.tufrepo import CUSTOM, INDEX, METADATA_DIR, TARGETS_DIR
from bms_ai.models.manifest import ModelEntry, read_manifest

MAX_TARGET_BYTES = 64 << 20    # a model is tens of KB; a larger signed length is refused before downloading
MAX_INDEX_BYTES = 1 << 20
MAX_ROOT_BYTES = 512 << 10
MAX_INDEX_ROWS = 1024
TMP_SUFFIX = ".part"           # neither .onnx nor .json: the model registry never looks at a half-written file

# kinds of rejection, as counted and reported
UNREACHABLE, SIGNATURE, EXPIRED, ROLLBACK, TAMPERED, METADATA, INVALID, DISK, CONFIG = (
    "unreachable", "signature", "expired", "rollback", "tampered", "metadata", "invalid", "disk", "config")
KINDS = (UNREACHABLE, SIGNATURE, EXPIRED, ROLLBACK, TAMPERED, METADATA, INVALID, DISK, CONFIG)
CHECK = "updates"              # the diagnostic check the model_updater node reports


class Rejected(Exception):  # noqa: N818  (an outcome, not a programming error)
    """Ends one poll (or one model) with a kind and a one-line reason."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def classify(exc: BaseException) -> str:
    """The rejection kind of an exception from the TUF client or the file system."""
    table = ((tuf_errors.UnsignedMetadataError, SIGNATURE), (tuf_errors.ExpiredMetadataError, EXPIRED),
             (tuf_errors.BadVersionNumberError, ROLLBACK), (tuf_errors.LengthOrHashMismatchError, TAMPERED),
             (tuf_errors.DownloadLengthMismatchError, TAMPERED), (tuf_errors.DownloadError, UNREACHABLE),
             (tuf_errors.RepositoryError, METADATA))
    for cls, kind in table:
        if isinstance(exc, cls):
            return kind
    import urllib3

    if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return UNREACHABLE
    if isinstance(exc, OSError):
        return DISK
    return INVALID


@dataclass(frozen=True)
class Offer:
    """One model the signed index offers: slot, version and its two target paths."""

    name: str
    task: str
    chemistry: str
    version: int
    file: str
    entry: str

    @property
    def key(self) -> tuple[str, str]:
        """(task, chemistry)."""
        return (self.task, self.chemistry)

    @property
    def label(self) -> str:
        """``name@version`` as the estimator reports models."""
        return f"{self.name}@{self.version}"

    @classmethod
    def from_row(cls, row: Any) -> Offer:
        """A row of ``models.json``; anything malformed is a Rejected(invalid)."""
        if not isinstance(row, dict):
            raise Rejected(INVALID, f"{INDEX}: a row is {type(row).__name__}, not an object")
        text = {k: row.get(k) for k in ("name", "task", "chemistry", "file", "entry")}
        version = row.get("version")
        if not all(isinstance(v, str) and v for v in text.values()) or not isinstance(version, int) \
                or isinstance(version, bool) or version < 0:
            raise Rejected(INVALID, f"{INDEX}: malformed row {_one_line(json.dumps(row, default=str), 120)}")
        for key in ("file", "entry"):
            if "/" in text[key] or text[key].startswith("."):
                raise Rejected(INVALID, f"{INDEX}: {key} {text[key]!r} is not a plain file name")
        if not text["file"].endswith(".onnx") or text["entry"] != text["file"] + ".json":
            raise Rejected(INVALID, f"{INDEX}: {text['file']!r} / {text['entry']!r} are not a model and its entry")
        return cls(version=version, **text)


@dataclass
class PollResult:
    """What one poll did: models installed, or the rejections (kind, reason) it counted."""

    installed: list[str] = field(default_factory=list)
    rejections: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing was rejected."""
        return not self.rejections


class ModelUpdater:
    """The vehicle's TUF client for models: poll the repository, install newer verified models atomically.

    ``trusted_root``: the root metadata shipped with the vehicle (its trust
    anchor; later root versions are fetched and verified through it).
    ``metadata_dir``: the client's metadata cache; it must persist across
    restarts, it is what detects a rollback to older metadata.
    ``chemistries``: only these slots are installed (empty = all).
    """

    def __init__(self, repo_url: str, trusted_root: str | os.PathLike, model_dir: str | os.PathLike,
                 metadata_dir: str | os.PathLike, chemistries: tuple[str, ...] = (),
                 max_target_bytes: int = MAX_TARGET_BYTES, timeout_s: int = 10) -> None:
        self.repo_url = repo_url.rstrip("/")
        self.trusted_root = Path(trusted_root)
        self.model_dir = Path(model_dir)
        self.metadata_dir = Path(metadata_dir)
        self.chemistries = tuple(chemistries)
        self.max_target_bytes = int(max_target_bytes)
        self.timeout_s = int(timeout_s)
        self.polls = 0
        self.installs = 0
        self.rejected = 0
        self.by_kind: Counter[str] = Counter()
        self.last_reason = ""
        self.last_kind = ""
        self.last_event = ""
        self.last_ok = True
        self.installed: dict[tuple[str, str], str] = {}   # slot -> label installed by this updater
        self.holding: dict[tuple[str, str], int] = {}     # slot -> newest version the model directory holds

    # -- one poll

    def poll(self) -> PollResult:
        """Fetch, verify and install whatever is newer; never raises (counts and reports instead)."""
        self.polls += 1
        result = PollResult()
        try:
            updater = self._updater()
            updater.refresh()
            offers = self._offers(updater)
        except Rejected as rej:
            return self._reject(result, rej)
        except Exception as exc:  # noqa: BLE001  (python-tuf, urllib3 and the OS raise many types)
            return self._reject(result, Rejected(classify(exc), f"metadata: {type(exc).__name__}: {exc}"))
        for offer in self._wanted(offers):
            try:
                self._install(updater, offer)
            except Rejected as rej:
                self._reject(result, Rejected(rej.kind, f"{offer.label}: {rej.reason}"))
                continue
            except Exception as exc:  # noqa: BLE001
                self._reject(result, Rejected(classify(exc), f"{offer.label}: {type(exc).__name__}: {exc}"))
                continue
            self.installs += 1
            self.installed[offer.key] = offer.label
            self.holding[offer.key] = offer.version
            self.last_event = f"installed {offer.label} for {offer.task}/{offer.chemistry}"
            result.installed.append(offer.label)
        self.last_ok = result.ok
        return result

    def _reject(self, result: PollResult, rej: Rejected) -> PollResult:
        reason = _one_line(rej.reason)
        self.rejected += 1
        self.by_kind[rej.kind] += 1
        self.last_kind, self.last_reason, self.last_ok = rej.kind, reason, False
        self.last_event = f"rejected ({rej.kind}): {reason}"
        result.rejections.append((rej.kind, reason))
        return result

    def _updater(self) -> Updater:
        """A fresh ngclient Updater (one refresh per instance) anchored in the shipped root."""
        try:
            root = read_bounded(self.trusted_root, "trusted root", MAX_ROOT_BYTES, _ConfigError, str(self.trusted_root))
        except _ConfigError as exc:
            raise Rejected(CONFIG, str(exc)) from None
        try:
            self.metadata_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Rejected(CONFIG, f"metadata_dir {self.metadata_dir}: {exc.strerror or exc}") from None
        config = UpdaterConfig(targets_max_length=4 << 20, snapshot_max_length=1 << 20, app_user_agent="bms_ai")
        try:
            return Updater(str(self.metadata_dir), f"{self.repo_url}/{METADATA_DIR}/",
                           target_base_url=f"{self.repo_url}/{TARGETS_DIR}/", config=config,
                           fetcher=Urllib3Fetcher(socket_timeout=self.timeout_s), bootstrap=root)
        except (tuf_errors.RepositoryError, ValueError) as exc:
            raise Rejected(CONFIG, f"trusted root {self.trusted_root.name}: {type(exc).__name__}: {exc}") from None

    def _offers(self, updater: Updater) -> list[Offer]:
        """The rows of the signed index (none published yet: [])."""
        info = updater.get_targetinfo(INDEX)
        if info is None:
            return []
        if info.length > MAX_INDEX_BYTES:
            raise Rejected(INVALID, f"{INDEX}: signed length {info.length} > {MAX_INDEX_BYTES} bytes")
        data = self._download(updater, info)
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise Rejected(INVALID, f"{INDEX}: not JSON: {exc}") from None
        rows = doc.get("models") if isinstance(doc, dict) else None
        if not isinstance(rows, list) or len(rows) > MAX_INDEX_ROWS:
            raise Rejected(INVALID, f"{INDEX}: expected {{\"models\": [...]}} with at most {MAX_INDEX_ROWS} rows")
        return [Offer.from_row(r) for r in rows]

    def _download(self, updater: Updater, info: TargetFile) -> bytes:
        """A verified target's bytes (TUF checks length and hashes before anything is returned)."""
        fd, tmp = tempfile.mkstemp(dir=self.metadata_dir, suffix=TMP_SUFFIX)
        os.close(fd)
        try:
            updater.download_target(info, filepath=tmp)
            return Path(tmp).read_bytes()
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _wanted(self, offers: list[Offer]) -> list[Offer]:
        """The newest offer per slot, where it is newer than every model the directory holds for that slot."""
        have: dict[tuple[str, str], int] = {}
        for e in read_manifest(self.model_dir)[0]:
            have[e.key] = max(have.get(e.key, -1), e.version)
        self.holding = dict(have)
        newest: dict[tuple[str, str], Offer] = {}
        for o in offers:
            if self.chemistries and o.chemistry not in self.chemistries and o.chemistry != "any":
                continue
            if o.version > have.get(o.key, -1) and (o.key not in newest or o.version > newest[o.key].version):
                newest[o.key] = o
        return [newest[k] for k in sorted(newest)]

    # -- installing one model

    def _target(self, updater: Updater, offer: Offer, path: str, kind: str) -> TargetFile:
        """The signed target info of one of the offer's files, which must describe that offer."""
        info = updater.get_targetinfo(path)
        if info is None:
            raise Rejected(INVALID, f"{path} is in the index but not a signed target")
        c = info.custom.get(CUSTOM) if isinstance(info.custom, dict) else None
        want = {"kind": kind, "name": offer.name, "task": offer.task, "chemistry": offer.chemistry,
                "version": offer.version}
        if not isinstance(c, dict) or any(c.get(k) != v for k, v in want.items()):
            raise Rejected(INVALID, f"the signed target info of {path} does not match the index")
        if info.length > self.max_target_bytes:
            raise Rejected(INVALID, f"{path} is {info.length} bytes, more than {self.max_target_bytes}")
        return info

    def _install(self, updater: Updater, offer: Offer) -> None:
        model_info = self._target(updater, offer, offer.file, "model")
        entry_info = self._target(updater, offer, offer.entry, "entry")
        staged: list[Path] = []
        try:
            model_tmp = self._stage(updater, model_info, offer.file, staged)
            entry_tmp = self._stage(updater, entry_info, offer.entry, staged)
            self._check_entry(offer, entry_tmp, model_info)
            for tmp, name in ((model_tmp, offer.file), (entry_tmp, offer.entry)):  # the .onnx first
                os.replace(tmp, self.model_dir / name)
            _fsync_dir(self.model_dir)
        finally:
            for p in staged:
                p.unlink(missing_ok=True)

    def _stage(self, updater: Updater, info: TargetFile, name: str, staged: list[Path]) -> Path:
        """Download a verified target into a temporary file of the model directory (same file system)."""
        fd, tmp = tempfile.mkstemp(dir=self.model_dir, prefix=f".{name}.", suffix=TMP_SUFFIX)
        os.close(fd)
        staged.append(Path(tmp))
        try:
            updater.download_target(info, filepath=tmp)
        except Exception as exc:  # noqa: BLE001  (named here: which of the two files failed)
            raise Rejected(classify(exc), f"{name}: {type(exc).__name__}: {exc}") from None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        return Path(tmp)

    @staticmethod
    def _check_entry(offer: Offer, entry_file: Path, model_info: TargetFile) -> None:
        """The manifest entry must describe exactly the signed model file it comes with."""
        try:
            entry = ModelEntry.from_dict(json.loads(entry_file.read_text()), offer.entry)
        except (ValueError, RecursionError) as exc:
            raise Rejected(INVALID, f"{_one_line(str(exc), 200)}") from None
        got = (entry.name, entry.task, entry.chemistry, entry.version, entry.file, entry.sha256)
        want = (offer.name, offer.task, offer.chemistry, offer.version, offer.file, model_info.hashes.get("sha256"))
        if got != want:
            raise Rejected(INVALID, f"its manifest entry describes {entry.name}@{entry.version} "
                                    f"({entry.file}, sha256 {entry.sha256[:12]}), not the signed model")

    # -- reporting

    def status(self) -> CheckStatus:
        """The ``updates`` check (``model_updater: updates``): ERROR when updates cannot work, WARN after a
        rejected poll (the installed models stay), else OK.
        """
        values: dict[str, Any] = {
            "repo_url": self.repo_url, "polls": self.polls, "installs": self.installs, "rejected": self.rejected,
            **{f"rejected_{k}": self.by_kind[k] for k in KINDS},
            "last_reason": self.last_reason, "last_event": self.last_event,
            "installed": ", ".join(f"{t}/{c}={label}" for (t, c), label in sorted(self.installed.items())),
            "model_versions": ", ".join(f"{t}/{c}={v}" for (t, c), v in sorted(self.holding.items())),
        }
        if self.polls == 0:
            return CheckStatus(CHECK, OK, "waiting for the first poll", values)
        if not self.last_ok and self.last_kind == CONFIG:
            return CheckStatus(CHECK, ERROR, f"cannot update models: {self.last_reason}", values)
        if not self.last_ok:
            return CheckStatus(CHECK, WARN, f"rejected ({self.last_kind}): {self.last_reason}", values)
        return CheckStatus(CHECK, OK, self.last_event or "models up to date", values)


class _ConfigError(Exception):
    """The trusted root file cannot be read (turned into a config rejection)."""


def _fsync_dir(path: Path) -> None:
    """Make the renames durable (a power cut must not lose an installed model's entry)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
