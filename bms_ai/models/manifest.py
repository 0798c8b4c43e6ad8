"""Model manifest: what a shipped ONNX model is, what it expects, and where it came from.

``models/manifest.json`` = {"schema": 1, "models": [entry, ...]}. A model can also
be dropped in with a sidecar ``<file>.onnx.json`` holding one entry (hot reload).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = 1
MANIFEST = "manifest.json"


@dataclass
class TensorSpec:
    """One model input or output as the manifest promises it; the runtime checks the ONNX graph against it."""

    name: str
    shape: list[Any]           # e.g. ["batch", 12]; strings are dynamic axes
    dtype: str = "float32"
    units: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)   # per-feature names (last axis)


@dataclass
class ModelEntry:
    """One model in the manifest: file, hash, contract, training domain and provenance."""

    name: str
    version: int
    file: str
    sha256: str
    task: str                  # soc | soh | rul
    chemistry: str             # nmc | lfp | any
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    feature_version: str
    normalisation: dict[str, Any] = field(default_factory=dict)
    domain: dict[str, Any] = field(default_factory=dict)    # per-feature min/max seen in training
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    params: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelEntry:
        """Parse a manifest entry; unknown keys are ignored (newer writers), missing ones are a ValueError."""
        try:
            d = dict(d)
            d["inputs"] = [TensorSpec(**t) for t in d["inputs"]]
            d["outputs"] = [TensorSpec(**t) for t in d["outputs"]]
            d["version"] = int(d["version"])
            known = set(cls.__dataclass_fields__)
            return cls(**{k: v for k, v in d.items() if k in known})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid manifest entry: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the manifest layout)."""
        return asdict(self)

    @property
    def key(self) -> tuple[str, str]:
        """(task, chemistry): the slot this model competes for."""
        return (self.task, self.chemistry)


def read_manifest(model_dir: Path) -> tuple[list[ModelEntry], list[str]]:
    """All entries in a model directory (manifest.json + sidecars); errors are returned, not raised."""
    model_dir = Path(model_dir)
    entries: list[ModelEntry] = []
    errors: list[str] = []
    path = model_dir / MANIFEST
    if path.exists():
        try:
            doc = json.loads(path.read_text())
            for d in doc.get("models", []):
                try:
                    entries.append(ModelEntry.from_dict(d))
                except ValueError as exc:
                    errors.append(f"{path.name}: {exc}")
        except (OSError, json.JSONDecodeError) as exc:
            errors.append(f"{path.name}: {exc}")
    for side in sorted(model_dir.glob("*.onnx.json")):
        try:
            entries.append(ModelEntry.from_dict(json.loads(side.read_text())))
        except (OSError, json.JSONDecodeError, ValueError) as exc:
            errors.append(f"{side.name}: {exc}")
    return entries, errors


def write_manifest(model_dir: Path, entries: list[ModelEntry]) -> Path:
    """Write manifest.json atomically (readers never see half a file)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    doc = {"schema": SCHEMA, "models": [e.to_dict() for e in sorted(entries, key=lambda e: (e.task, e.chemistry, e.version))]}
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def upsert_entry(model_dir: Path, entry: ModelEntry) -> Path:
    """Add or replace (same name and version) one entry of manifest.json; sidecar entries stay in their files."""
    entries, _ = read_manifest(model_dir)
    entries = [e for e in entries if not (e.name == entry.name and e.version == entry.version)]
    # sidecars are re-read each time; keep only manifest.json entries here
    side = {p.name.removesuffix(".json") for p in Path(model_dir).glob("*.onnx.json")}
    entries = [e for e in entries if e.file not in side]
    entries.append(entry)
    return write_manifest(model_dir, entries)
