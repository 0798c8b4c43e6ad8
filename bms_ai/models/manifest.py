"""Model manifest: what a shipped ONNX model is, what it expects, and where it came from.

``models/manifest.json`` = {"schema": 1, "models": [entry, ...]}. A model can also
be dropped in with a sidecar ``<file>.onnx.json`` holding one entry (hot reload).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bms_ai.core.files import load_json

SCHEMA = 1
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A manifest document or entry is malformed; the message names the entry and the field."""


def _shown(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _expect(ok: bool, where: str, what: str, v: Any) -> None:
    if not ok:
        raise ManifestError(f"{where}: expected {what}, got {_shown(v)}")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _strings(v: Any, where: str) -> list[str]:
    _expect(isinstance(v, list) and all(isinstance(x, str) for x in v), where, "a list of strings", v)
    return list(v)


def _mapping(v: Any, where: str) -> dict[str, Any]:
    _expect(isinstance(v, dict), where, "an object", v)
    return dict(v)


@dataclass
class TensorSpec:
    """One model input or output as the manifest promises it; the runtime checks the ONNX graph against it.

    ``range`` ([low, high], null = unbounded) is the span of plausible values
    of an output: the run-time output guard refuses anything outside it.
    """

    name: str
    shape: list[Any]           # e.g. ["batch", 12]; strings are dynamic axes
    dtype: str = "float32"
    units: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)   # per-feature names (last axis)
    range: list[float | None] | None = None          # outputs: [low, high] of every element

    @classmethod
    def from_dict(cls, t: Any, where: str) -> TensorSpec:
        """Parse and type-check one tensor spec; a ManifestError names the field."""
        t = _mapping(t, where)
        name = t.get("name")
        _expect(isinstance(name, str) and bool(name), f"{where}.name", "a non-empty string", name)
        shape = t.get("shape")
        _expect(isinstance(shape, list) and 0 < len(shape) <= 8 and all(
            isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 20)
            for d in shape), f"{where}.shape", "a list of 1..8 axis sizes (positive integers or names)", shape)
        dtype = t.get("dtype", "float32")
        _expect(isinstance(dtype, str), f"{where}.dtype", "a string", dtype)
        rng = t.get("range")
        _expect(rng is None or (isinstance(rng, list) and len(rng) == 2 and all(x is None or _is_num(x) for x in rng)
                                and (None in rng or rng[0] <= rng[1])),
                f"{where}.range", "[low, high] (numbers or null, low <= high)", rng)
        return cls(name=name, shape=list(shape), dtype=dtype, units=_strings(t.get("units", []), f"{where}.units"),
                   names=_strings(t.get("names", []), f"{where}.names"), range=None if rng is None else list(rng))

    @property
    def bounds(self) -> tuple[float, float]:
        """(low, high) of the declared range, infinite where unbounded."""
        low, high = self.range or (None, None)
        return (-math.inf if low is None else float(low), math.inf if high is None else float(high))


_ENTRY_TEXT = ("name", "file", "sha256", "task", "chemistry", "feature_version")
_ENTRY_MAPS = ("normalisation", "domain", "provenance", "metrics", "extra")


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
    def from_dict(cls, d: Any, where: str = "entry") -> ModelEntry:
        """Parse and type-check a manifest entry; unknown keys are ignored (newer writers).

        Anything missing or of the wrong type is a ManifestError (a ValueError)
        naming the field, so a bad entry is refused, never a crash later.
        """
        d = _mapping(d, where)
        kw: dict[str, Any] = {}
        for key in _ENTRY_TEXT:
            v = d.get(key)
            _expect(isinstance(v, str) and bool(v), f"{where}.{key}", "a non-empty string", v)
            kw[key] = v
        _expect(not Path(kw["file"]).is_absolute() and ".." not in Path(kw["file"]).parts,
                f"{where}.file", "a path inside the model directory", kw["file"])
        version = d.get("version")
        _expect(isinstance(version, int) and not isinstance(version, bool) and version >= 0,
                f"{where}.version", "an integer >= 0", version)
        for key in ("inputs", "outputs"):
            specs = d.get(key)
            _expect(isinstance(specs, list) and 0 < len(specs) <= 64, f"{where}.{key}", "a list of 1..64 tensors", specs)
            kw[key] = [TensorSpec.from_dict(t, f"{where}.{key}[{i}]") for i, t in enumerate(specs)]
        for key in _ENTRY_MAPS:
            kw[key] = _mapping(d.get(key, {}), f"{where}.{key}")
        params = d.get("params", 0)
        _expect(isinstance(params, int) and not isinstance(params, bool), f"{where}.params", "an integer", params)
        entry = cls(version=version, params=params, **kw)
        entry._check_domain(where)
        return entry

    def _check_domain(self, where: str) -> None:
        """The training domain, when given, has one finite min and max per input feature."""
        n = self.inputs[0].shape[-1]
        for key in ("min", "max"):
            if key in self.domain:
                v = self.domain[key]
                ok = isinstance(v, list) and all(_is_num(x) for x in v) and (not isinstance(n, int) or len(v) == n)
                _expect(ok, f"{where}.domain.{key}", f"a list of {n} finite numbers", v)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the manifest layout); an output without a range has no ``range`` key."""
        d = asdict(self)
        for spec in d["inputs"] + d["outputs"]:
            if spec["range"] is None:
                del spec["range"]
        return d

    @property
    def key(self) -> tuple[str, str]:
        """(task, chemistry): the slot this model competes for."""
        return (self.task, self.chemistry)


MAX_ENTRIES = 256  # a model directory holds a handful; more is not a manifest we wrote


def _manifest_entries(doc: Any, name: str) -> tuple[list[ModelEntry], list[str]]:
    """Entries of a parsed manifest.json; every problem is a message, nothing raises."""
    if not isinstance(doc, dict):
        return [], [f"{name}: expected an object {{\"schema\": {SCHEMA}, \"models\": [...]}}, got {_shown(doc)}"]
    models = doc.get("models", [])
    if not isinstance(models, list):
        return [], [f"{name}: 'models' must be a list of entries, got {_shown(models)}"]
    if len(models) > MAX_ENTRIES:
        return [], [f"{name}: {len(models)} entries, more than {MAX_ENTRIES}"]
    entries, errors = [], []
    for i, d in enumerate(models):
        try:
            entries.append(ModelEntry.from_dict(d, f"models[{i}]"))
        except ValueError as exc:
            errors.append(f"{name}: {exc}")
    return entries, errors


def read_manifest(model_dir: Path) -> tuple[list[ModelEntry], list[str]]:
    """All entries in a model directory (manifest.json + sidecars); errors are returned, never raised.

    A malformed document, entry or sidecar only costs its own entries: the
    caller keeps the models it has and reports the errors.
    """
    model_dir = Path(model_dir)
    entries: list[ModelEntry] = []
    errors: list[str] = []
    path = model_dir / MANIFEST
    if path.is_file():
        try:
            got, errs = _manifest_entries(load_json(path, "model manifest"), path.name)
            entries += got
            errors += errs
        except ValueError as exc:
            errors.append(str(exc))
    try:
        sidecars = sorted(model_dir.glob("*.onnx.json"))[:MAX_ENTRIES]
    except OSError as exc:
        return entries, [*errors, f"{model_dir}: {exc.strerror or exc}"]
    for side in sidecars:
        try:
            entries.append(ModelEntry.from_dict(load_json(side, "model sidecar"), side.name))
        except ValueError as exc:
            errors.append(str(exc) if str(exc).startswith(side.name) else f"{side.name}: {exc}")
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
