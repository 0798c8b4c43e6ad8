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
