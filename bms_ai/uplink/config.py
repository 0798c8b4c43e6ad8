"""Uploader configuration: defaults, YAML loading, deep merge, secrets from the environment."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from typing import Any

from bms_ai.core.paths import share_path
from bms_ai.core.yamlfile import load_yaml

DEFAULTS: dict[str, Any] = {
    "vehicle_id": "",
    "spool": {"dir": "~/.local/share/bms_ai/spool", "quota_mb": 1024, "min_free_mb": 256, "fsync": True},
    "segments": {"max_mb": 8.0, "max_duration_s": 60.0, "compression": "zstd", "chunk_kb": 64},
    "topics": {"pack/measurements": "raw", "battery_state": "estimates", "/diagnostics": "diagnostics",
               "/rosout": "diagnostics"},
    "topic_types": {},  # topic -> pkg/msg/Type for topics not in the node's known list (else discovered)
    "default_class": "raw",
    "fault_snapshot": {"enabled": True, "pre_s": 30.0, "post_s": 30.0},
    # https by default; plain http only when a config names it (the backend then warns)
    "backend": {"kind": "http", "url": "https://127.0.0.1:8443", "token_env": "BMS_AI_INGEST_TOKEN"},
    "retry": {"base_s": 1.0, "max_s": 300.0, "factor": 2.0, "jitter": True},
    "bandwidth_kbps": 0.0,
    "backlog": {"order": "oldest_first", "max_age_s": {}, "warn_age_s": 86400.0},
    "privacy": {"enabled": False, "key_env": "BMS_AI_PSEUDONYM_KEY"},
    "telemetry": {"enabled": False, "kind": "mqtt", "host": "127.0.0.1", "port": 1883,
                  "topic_prefix": "bms_ai/vehicle", "rate_hz": 1.0, "qos": 1, "retain": True},
    "can_logs": {"enabled": False, "dir": "", "patterns": ["*.blf", "*.log", "*.asc"], "min_age_s": 5.0,
                 "delete_after_pickup": False, "class": "raw"},
}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Nested merge; a section that names a different ``kind`` (backend) replaces the default whole."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        replace = k in ("topics", "max_age_s", "topic_types") or (
            isinstance(v, dict) and isinstance(out.get(k), dict) and "kind" in v and v["kind"] != out[k].get("kind"))
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not replace:
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def default_config_path() -> str:
    """The shipped config/uploader.yaml (source tree or installed share/), or "" if there is none."""
    p = share_path("config", "uploader.yaml")
    return str(p) if p.is_file() else ""


def load_config(path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULTS <- file (its ``uplink:`` section or the whole document) <- overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        doc = load_yaml(path, "uploader config") or {}
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected a mapping")
        cfg = deep_merge(cfg, doc.get("uplink", doc))
    return deep_merge(cfg, overrides or {})


def parameter_overrides(spool_dir: str = "", backend_url: str = "", token_file: str = "", token_env: str = "",
                        vehicle_id: str = "", topics: Iterable[str] = ()) -> dict[str, Any]:
    """Config overrides from the node's parameters: empty values leave the file's settings alone.

    The ingest token itself is never a parameter (parameters are visible on /parameter_events and to
    anyone calling get_parameters): only the file or environment variable that holds it.
    ``topics`` entries are ``topic=class`` (a bare topic records as ``raw``) and replace the file's list.
    """
    over: dict[str, Any] = {}
    if spool_dir:
        over["spool"] = {"dir": spool_dir}
    backend = {k: v for k, v in (("url", backend_url), ("token_file", token_file), ("token_env", token_env)) if v}
    if backend:
        over["backend"] = backend
    if vehicle_id:
        over["vehicle_id"] = vehicle_id
    wanted = [t for t in topics if t]
    if wanted:
        over["topics"] = dict(t.split("=", 1) if "=" in t else (t, "raw") for t in wanted)
    return over


SECRET_FILE_KEYS = ("token", "access_key", "secret_key", "password")


def _read_secret(key: str, path: str) -> str:
    try:
        return open(os.path.expanduser(path), encoding="utf-8").read().strip()  # noqa: SIM115
    except OSError as exc:
        raise ValueError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def resolve_env(section: dict[str, Any]) -> dict[str, Any]:
    """Secrets from files or the environment: ``token_file: PATH`` / ``token_env: NAME`` -> ``token``.

    Explicit values win, then the file, then the environment variable.
    """
    out = {}
    for k, v in section.items():
        if k.endswith("_file") and k[:-5] in SECRET_FILE_KEYS:
            if v and not section.get(k[:-5]):
                out[k[:-5]] = _read_secret(k, str(v))
        elif k.endswith("_env"):
            name = k[:-4]
            if not section.get(name) and not section.get(f"{name}_file") and v:
                val = os.environ.get(str(v))
                if val is not None:
                    out[name] = val
        else:
            out.setdefault(k, v)
            if v not in (None, ""):
                out[k] = v
    return out
