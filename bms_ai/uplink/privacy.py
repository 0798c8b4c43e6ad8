"""Pseudonymisation of pack serial / VIN with a keyed hash before anything leaves the vehicle.

HMAC-SHA256 with a fleet secret: stable per vehicle (so the cloud can join
segments of one pack) but not reversible or guessable without the key, unlike a
plain hash of a 17-character VIN.
"""

from __future__ import annotations

import hashlib
import hmac
import os


class Pseudonymizer:
    """Keyed pseudonyms for identifiers; the identity when disabled."""

    def __init__(self, key: bytes | str | None, length: int = 24, prefix: str = "p-") -> None:
        if isinstance(key, str):
            key = key.encode()
        self.key = key or b""
        self.length = int(length)
        self.prefix = prefix
        self._cache: dict[str, str] = {}

    @classmethod
    def from_config(cls, cfg: dict | None) -> Pseudonymizer:
        """``{enabled, key, key_env, key_file}``; disabled -> identity. Enabled without a key is an error."""
        cfg = dict(cfg or {})
        if not cfg.get("enabled", False):
            return cls(None)
        key: str | bytes | None = cfg.get("key") or None
        if not key and cfg.get("key_env"):
            key = os.environ.get(str(cfg["key_env"])) or None
        if not key and cfg.get("key_file"):
            with open(cfg["key_file"], "rb") as f:
                key = f.read().strip()
        if not key:
            raise ValueError("privacy.enabled needs a key (privacy.key, privacy.key_env or privacy.key_file)")
        return cls(key, int(cfg.get("length", 24)))

    @property
    def enabled(self) -> bool:
        """Whether a key is set (otherwise identifiers pass unchanged)."""
        return bool(self.key)

    def __call__(self, identifier: str) -> str:
        """The stable pseudonym of ``identifier`` (empty stays empty)."""
        if not self.enabled or not identifier:
            return identifier
        got = self._cache.get(identifier)
        if got is None:
            got = self.prefix + hmac.new(self.key, identifier.encode(), hashlib.sha256).hexdigest()[: self.length]
            if len(self._cache) < 4096:
                self._cache[identifier] = got
        return got


class IdentifierScrubber:
    """Replaces known identifiers (VIN, pack serial, hardware ids) by their pseudonyms in any message.

    Identifiers are configured (vehicle id, pack id) or learned from the fields that carry them
    (``BatteryState.serial_number``, ``DiagnosticStatus.hardware_id``). A message is scanned as raw CDR
    bytes first (strings are stored as plain UTF-8 there), so only messages that contain an identifier
    are decoded; then every string field, nested or in a list, gets each identifier replaced. The caller
    re-checks the bytes and drops the message if an identifier survived (e.g. in a byte array).
    """

    MIN_LEN = 4  # shorter strings would match everywhere
    MAX_IDS = 64

    def __init__(self, pseudonymize: Pseudonymizer, identifiers: tuple[str, ...] | list[str] = ()) -> None:
        self.pseudonymize = pseudonymize
        self._ids: dict[str, str] = {}
        self._needles: list[bytes] = []
        for ident in identifiers:
            self.learn(ident)

    @property
    def enabled(self) -> bool:
        """Scrubbing is on with pseudonymisation."""
        return self.pseudonymize.enabled

    def learn(self, identifier: str) -> None:
        """Treat ``identifier`` as personal from now on (ignored when short, a pseudonym, or too many)."""
        ident = str(identifier or "").strip()
        if (not self.enabled or len(ident) < self.MIN_LEN or ident in self._ids
                or ident.startswith(self.pseudonymize.prefix) or len(self._ids) >= self.MAX_IDS):
            return
        self._ids[ident] = self.pseudonymize(ident)
        self._ids = dict(sorted(self._ids.items(), key=lambda kv: -len(kv[0])))  # longest first
        self._needles = [k.encode() for k in self._ids]

    def hits(self, data: bytes) -> bool:
        """Whether the raw bytes contain any known identifier."""
        return any(n in data for n in self._needles)

    def text(self, s: str) -> str:
        """``s`` with every known identifier replaced by its pseudonym."""
        for ident, pseudo in self._ids.items():
            if ident in s:
                s = s.replace(ident, pseudo)
        return s

    def message(self, msg: object) -> object:
        """Scrub every string field of a ROS message object in place (nested messages and lists too)."""
        fields = getattr(msg, "get_fields_and_field_types", None)
        if fields is None:
            return msg
        for name in fields():
            value = getattr(msg, name)
            if isinstance(value, str):
                setattr(msg, name, self.text(value))
            elif isinstance(value, list):
                setattr(msg, name, [self.text(v) if isinstance(v, str) else self.message(v) for v in value])
            elif hasattr(value, "get_fields_and_field_types"):
                self.message(value)
        return msg
