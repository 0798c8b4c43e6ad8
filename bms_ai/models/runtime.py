"""ONNX model runtime: verified loading, contract checks, fallback reasons, hot reload.

A model that fails any check is never used and never raises into the caller:
``load_model`` returns ``LoadResult(model=None, reason=...)`` and the estimator
falls back to its classical filter, reporting the reason.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from bms_ai.core.files import sha256_file
from bms_ai.core.paths import share_path
from bms_ai.models.manifest import ModelEntry, TensorSpec, read_manifest

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64"}


@dataclass
class GuardVerdict:
    """The output guard's answer for one inference: which rows may be used, and why others may not."""

    ok: np.ndarray          # bool per row (batch element): every output value finite and within its range
    reason: str = ""        # the first refusal of this call ("" when every row passed)

    @property
    def all_ok(self) -> bool:
        """Every row passed: the caller uses the outputs as they are."""
        return bool(self.ok.all())


class OutputGuard:
    """Run-time check of a model's outputs against its manifest entry: finite and within the declared range.

    The load-time smoke test runs on zeros, so a model that gives NaN only on
    real inputs, or 1e30 on some, passes it; this guard sees every inference.
    Rows (batch elements, e.g. cells) are judged one by one so the caller can
    fall back for the refused ones only. Counters feed the caller's
    diagnostics; nothing here raises on bad outputs. The check is a few
    vectorised comparisons per output (it runs every estimator cycle); the
    reason is worked out only when something is refused.
    """

    def __init__(self, specs: list[TensorSpec], label: str = "") -> None:
        self.specs = list(specs)
        self.label = label
        self.bounds = [s.bounds for s in self.specs]
        self.calls = 0
        self.rows = 0
        self.rejected_rows = 0
        self.rejected_calls = 0
        self.consecutive_rejected_calls = 0
        self.non_finite = 0
        self.out_of_range = 0
        self.bad_shape = 0
        self.last_reason = ""
        self._passed: dict[int, np.ndarray] = {}   # rows -> a read-only all-True verdict (the usual answer)

    def check(self, outputs: list[np.ndarray], rows: int | None = None) -> GuardVerdict:
        """The verdict for one inference's outputs (in manifest order), counted.

        ``rows``: the batch size of the inputs; outputs with another row count
        cannot be matched to the batch elements and are refused as a whole.
        """
        arrays = [np.asarray(o) for o in outputs]
        n = rows if rows is not None else (arrays[0].shape[0] if arrays and arrays[0].ndim else 1)
        if len(arrays) < len(self.specs) or any((a.shape[0] if a.ndim else 1) != n or (n and a.size == 0)
                                                for a in arrays):
            self.bad_shape += 1
            return self.refuse(n, f"outputs {[a.shape for a in arrays]} do not match "
                                  f"{[s.name for s in self.specs]} (one row per batch element, {n} rows)")
        if n and self._all_inside(arrays):   # the usual case, two reductions per output
            return self._count(GuardVerdict(self._all_rows(n)), passed=True)
        ok = np.ones(n, dtype=bool)
        for (low, high), a in zip(self.bounds, arrays):
            v = a.reshape(n, -1)
            inside = (v >= low) & (v <= high)      # NaN compares False: refused here too
            if not (np.isfinite(low) and np.isfinite(high)):
                inside &= np.isfinite(v)
            ok &= inside.all(axis=1)
        if ok.all():
            return self._count(GuardVerdict(ok), passed=n > 0)
        return self._count(GuardVerdict(ok, self._explain(arrays, n)))

    def _all_rows(self, n: int) -> np.ndarray:
        """The all-passed verdict for ``n`` rows, made once (read-only: callers combine it, never change it)."""
        ok = self._passed.get(n)
        if ok is None:
            ok = self._passed[n] = np.ones(n, dtype=bool)
            ok.flags.writeable = False
        return ok

    def _all_inside(self, arrays: list[np.ndarray]) -> bool:
        """Every value finite and within range: min and max decide it (a NaN makes both NaN, which fails)."""
        for (low, high), a in zip(self.bounds, arrays):
            # the ufunc reductions themselves: ndarray.min/max add a Python frame each (every estimator cycle)
            lo, hi = float(np.minimum.reduce(a, axis=None)), float(np.maximum.reduce(a, axis=None))
            if not (low <= lo and hi <= high and math.isfinite(lo) and math.isfinite(hi)):
                return False
        return True

    def _explain(self, arrays: list[np.ndarray], rows: int) -> str:
        """Count the kinds of refusal and name the first (only called when something was refused)."""
        reason = ""
        for spec, (low, high), a in zip(self.specs, self.bounds, arrays):
            v = a.reshape(rows, -1).astype(np.float64, copy=False)
            finite = np.isfinite(v).all(axis=1)
            inside = finite & ((v >= low) & (v <= high)).all(axis=1)
            if not finite.all():
                self.non_finite += int((~finite).sum())
                reason = reason or f"{spec.name}: non-finite output in {int((~finite).sum())} of {rows} rows"
            if not (inside | ~finite).all():
                n = int((finite & ~inside).sum())
                self.out_of_range += n
                worst = float(v[finite & ~inside].flat[np.abs(v[finite & ~inside]).argmax()])
                reason = reason or f"{spec.name}: {worst:.4g} outside the declared range [{low:g}, {high:g}] in {n} of {rows} rows"
        return reason

    def refuse(self, rows: int, reason: str) -> GuardVerdict:
        """Count an inference whose outputs cannot be used at all (wrong shape, inference error)."""
        return self._count(GuardVerdict(np.zeros(max(int(rows), 0), dtype=bool), reason))

    def _count(self, verdict: GuardVerdict, passed: bool = False) -> GuardVerdict:
        self.calls += 1
        self.rows += verdict.ok.size
        if passed:   # the fast path: every row passed
            self.consecutive_rejected_calls = 0
            return verdict
        self.rejected_rows += int((~verdict.ok).sum())
        self.rejected_calls += 1
        self.consecutive_rejected_calls += 1
        self.last_reason = f"{self.label}: {verdict.reason}" if self.label else verdict.reason
        return verdict

    def stats(self) -> dict[str, int | str]:
        """Counters for diagnostics key-values."""
        return {"guard_calls": self.calls, "guard_rejected_calls": self.rejected_calls,
                "guard_rejected_rows": self.rejected_rows, "guard_non_finite": self.non_finite,
                "guard_out_of_range": self.out_of_range, "guard_bad_shape": self.bad_shape,
                "guard_last_reason": self.last_reason}


def guarded(guard: OutputGuard, run: Callable[[], list[np.ndarray]], rows: int) -> tuple[list[np.ndarray], GuardVerdict]:
    """``run()``'s outputs and the guard's verdict for a batch of ``rows``; an inference error refuses every row.

    Every ONNX user goes through here (``LoadedModel.run_guarded``, the fault
    detectors' plating model), so none of them sees an unchecked output or an
    exception from onnxruntime.
    """
    try:
        outs = run()
    except Exception as exc:  # noqa: BLE001  (onnxruntime raises many types; the caller falls back)
        return [], guard.refuse(rows, f"inference failed: {type(exc).__name__}: {exc}")
    return outs, guard.check(outs, rows)


class LoadedModel:
    """A verified ONNX session plus its manifest entry."""

    def __init__(self, entry: ModelEntry, session, path: Path) -> None:
        self.entry = entry
        self.session = session
        self.path = path
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.guard = OutputGuard(entry.outputs, self.label)

    @property
    def version(self) -> int:
        """Manifest version (newer versions replace older ones on hot reload)."""
        return self.entry.version

    @property
    def label(self) -> str:
        """``name@version``, as reported in diagnostics."""
        return f"{self.entry.name}@{self.entry.version}"

    def run(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Outputs for the inputs in manifest order (cast to float32, the contract's dtype)."""
        feeds = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in zip(self.input_names, arrays)}
        return self.session.run(self.output_names, feeds)

    def run_guarded(self, *arrays: np.ndarray) -> tuple[list[np.ndarray], GuardVerdict]:
        """Outputs plus the guard's verdict per row; an inference error refuses every row instead of raising."""
        rows = int(np.shape(arrays[0])[0]) if arrays and np.ndim(arrays[0]) else 1
        return guarded(self.guard, lambda: self.run(*arrays), rows)


@dataclass
class LoadResult:
    """Outcome of verifying one manifest entry: the model, or the reason it was refused."""

    model: LoadedModel | None
    reason: str = ""
    entry: ModelEntry | None = None


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _check_contract(entry: ModelEntry, session) -> str:
    ins, outs = session.get_inputs(), session.get_outputs()
    if len(ins) != len(entry.inputs) or len(outs) < len(entry.outputs):
        return f"input/output count mismatch: model has {len(ins)} inputs, manifest {len(entry.inputs)}"
    for spec, actual in zip(entry.inputs, ins):
        if spec.name != actual.name:
            return f"input name mismatch: manifest {spec.name!r}, model {actual.name!r}"
        if _ORT_DTYPES.get(actual.type, actual.type) != spec.dtype:
            return f"input {spec.name!r} dtype mismatch: manifest {spec.dtype}, model {actual.type}"
        if len(spec.shape) != len(actual.shape):
            return f"input {spec.name!r} rank mismatch: manifest {spec.shape}, model {actual.shape}"
        for want, got in zip(spec.shape, actual.shape):
            if isinstance(want, int) and want != got:
                return f"input {spec.name!r} shape mismatch: manifest {spec.shape}, model {actual.shape}"
    for spec, actual in zip(entry.outputs, outs):
        if spec.name != actual.name:
            return f"output name mismatch: manifest {spec.name!r}, model {actual.name!r}"
    return ""


def _output_contract(entry: ModelEntry, want: dict[str, tuple[float, float]]) -> tuple[ModelEntry, str]:
    """The entry with the pipeline's output ranges where it declares none, or why its outputs do not fit.

    ``want`` maps the outputs the pipeline reads (in order) to their plausible
    range: a manifest without ranges (or from an older trainer) still gets an
    output guard that refuses 1e30, not only NaN.
    """
    if not want:
        return entry, ""
    names = [s.name for s in entry.outputs]
    if names[:len(want)] != list(want):
        return entry, f"output contract: manifest outputs {names}, pipeline reads {list(want)} first"
    outputs = [replace(s, range=list(want[s.name])) if s.range is None and s.name in want else s
               for s in entry.outputs]
    return replace(entry, outputs=outputs), ""


def verify_and_load(model_dir: Path, entry: ModelEntry, expect: dict | None = None) -> LoadResult:
    """Hash, contract and smoke-inference checks; never raises.

    ``expect``: what the pipeline needs (``feature_version``, ``n_features``,
    ``outputs``: name -> plausible range, see ``_output_contract``).
    """
    path = Path(model_dir) / entry.file
    expect = expect or {}
    try:
        entry, why = _output_contract(entry, expect.get("outputs") or {})
        if why:
            return LoadResult(None, f"{entry.name}@{entry.version}: {why}", entry)
        if entry.feature_version != expect.get("feature_version", entry.feature_version):
            return LoadResult(None, f"{entry.name}@{entry.version}: feature version {entry.feature_version} "
                                    f"!= pipeline {expect['feature_version']}", entry)
        want_in = expect.get("n_features")
        if want_in is not None and entry.inputs and entry.inputs[0].shape[-1] != want_in:
            return LoadResult(None, f"{entry.name}@{entry.version}: input contract expects "
                                    f"{entry.inputs[0].shape[-1]} features, pipeline gives {want_in}", entry)
        if not path.is_file():
            return LoadResult(None, f"{entry.name}@{entry.version}: file {entry.file} missing", entry)
        digest = sha256_file(path)
        if digest != entry.sha256:
            return LoadResult(None, f"{entry.name}@{entry.version}: sha256 mismatch "
                                    f"(manifest {entry.sha256[:12]}, file {digest[:12]})", entry)
        sess = _session(path)
        why = _check_contract(entry, sess)
        if why:
            return LoadResult(None, f"{entry.name}@{entry.version}: {why}", entry)
        model = LoadedModel(entry, sess, path)
        # smoke inference on zeros with batch 2: catches broken graphs before they go live
        arrays = [np.zeros([2 if not isinstance(d, int) else d for d in s.shape], np.float32) for s in entry.inputs]
        outs = model.run(*arrays)
        smoke = OutputGuard(entry.outputs).check(outs)
        if not smoke.all_ok:
            return LoadResult(None, f"{entry.name}@{entry.version}: smoke input: {smoke.reason}", entry)
        return LoadResult(model, "", entry)
    except Exception as exc:  # onnxruntime raises many types; a bad model must not crash anything
        return LoadResult(None, f"{entry.name}@{entry.version}: load failed: {type(exc).__name__}: {exc}", entry)


def _dir_signature(model_dir: Path) -> tuple:
    try:
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                            for p in Path(model_dir).iterdir() if p.suffix in (".json", ".onnx")))
    except OSError:
        return ()


NO_MODEL = "no model"


@dataclass
class ModelSlot:
    """The active model for one (task, chemistry) and why anything else was refused."""

    model: LoadedModel | None = None
    reason: str = NO_MODEL
    rejected: dict[tuple, str] = field(default_factory=dict)


class ModelRegistry:
    """Loads the best valid model per (task, chemistry) and hot-reloads on directory changes.

    A newer version is validated before it is swapped in; a bad one is
    rejected (remembered by name+version+hash so it is not retried every poll)
    and the current model stays.
    """

    def __init__(self, model_dir: str | os.PathLike, expect: dict[str, dict] | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.expect = expect or {}
        self.slots: dict[tuple[str, str], ModelSlot] = {}
        self._sig: tuple | None = None
        self.reloads = 0
        self.events: list[str] = []
        self.errors: list[str] = []  # manifest errors of the last scan

    def slot(self, task: str, chemistry: str) -> ModelSlot:
        """The slot serving (task, chemistry): its own, else a chemistry-independent ("any") one."""
        s = self.slots.get((task, chemistry)) or self.slots.get((task, "any"))
        return s if s is not None else self.slots.setdefault((task, chemistry), ModelSlot(reason=self._no_model_reason()))

    def get(self, task: str, chemistry: str) -> LoadedModel | None:
        """The active model for (task, chemistry), or None (the caller falls back and reports the slot's reason)."""
        return self.slot(task, chemistry).model

    def poll(self) -> bool:
        """Re-scan if the directory changed; returns True when any active model changed.

        Never raises: a broken manifest or model costs only its own entries,
        the active models stay, and the errors go to ``events`` and to the
        reason of every slot without a model.
        """
        sig = _dir_signature(self.model_dir)
        if sig == self._sig:
            return False
        self._sig = sig
        try:
            entries, errors = read_manifest(self.model_dir)
        except Exception as exc:  # noqa: BLE001  (read_manifest returns its errors; this is the last line)
            entries, errors = [], [f"{self.model_dir}: {type(exc).__name__}: {exc}"]
        if not self.model_dir.is_dir():  # a mistyped path must not pass for "no model trained yet"
            errors = [f"model directory not found: {self.model_dir}"]
        self.errors = errors
        for e in errors:
            self._event(f"manifest error: {e}")
        changed = False
        by_key: dict[tuple[str, str], list[ModelEntry]] = {}
        for e in entries:
            by_key.setdefault(e.key, []).append(e)
        for key, cands in by_key.items():
            changed = self._update_slot(key, cands) or changed
        for slot in self.slots.values():
            if slot.model is None and slot.reason.startswith(NO_MODEL):
                slot.reason = self._no_model_reason()
        return changed

    def _no_model_reason(self) -> str:
        return f"{NO_MODEL}: {self.errors[0]}" if self.errors else NO_MODEL

    def _update_slot(self, key: tuple[str, str], cands: list[ModelEntry]) -> bool:
        """Swap in the newest candidate that verifies; True if the active model changed."""
        slot = self.slots.setdefault(key, ModelSlot(reason=self._no_model_reason()))
        current = slot.model
        for e in sorted(cands, key=lambda e: -e.version):
            if current is not None and e.version <= current.version and e.sha256 == current.entry.sha256:
                break  # the active model is still the best
            if current is not None and e.version < current.version:
                break  # never downgrade implicitly
            rid = (e.name, e.version, e.sha256)
            if rid in slot.rejected:
                continue
            res = verify_and_load(self.model_dir, e, self.expect.get(e.task))
            if res.model is None:
                slot.rejected[rid] = res.reason
                self._event(f"rejected {res.reason}")
                if current is None:
                    slot.reason = res.reason
                continue
            slot.model, slot.reason = res.model, ""
            self.reloads += 1
            self._event(f"loaded {res.model.label} for {key[0]}/{key[1]}")
            return True
        return False

    def retire(self, model: LoadedModel, reason: str) -> bool:
        """Take a model out of service at run time (e.g. its output guard keeps refusing it).

        Its slot falls back (the caller's classical filter) with ``reason``, and
        the same file is not loaded again; a new version dropped in later is.
        Returns False if ``model`` is not active any more.
        """
        for key, slot in self.slots.items():
            if slot.model is model:
                e = model.entry
                slot.model, slot.reason = None, f"{model.label} retired: {reason}"
                slot.rejected[(e.name, e.version, e.sha256)] = slot.reason
                self._event(f"retired {model.label} for {key[0]}/{key[1]}: {reason}")
                return True
        return False

    def _event(self, msg: str) -> None:
        self.events.append(msg)
        del self.events[:-50]

    def last_rejection(self, task: str, chemistry: str) -> str:
        """Why the most recently refused model for (task, chemistry) was refused ("" if none)."""
        s = self.slot(task, chemistry)
        return next(reversed(s.rejected.values()), "") if s.rejected else ""


def default_model_dir() -> Path:
    """The shipped models/ (source tree or installed share directory, see bms_ai.core.paths)."""
    return share_path("models")
