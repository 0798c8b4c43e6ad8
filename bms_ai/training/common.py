"""Shared training helpers: seeding, drive loading, time-series filters, ONNX export, manifest entries."""

from __future__ import annotations

import hashlib
import math
import os
import random
import time
from pathlib import Path

import numpy as np

from bms_ai.core.files import sha256_file
from bms_ai.models.manifest import ModelEntry, TensorSpec, read_manifest, upsert_entry
from bms_ai.sim.dataset import RecordedDrive, find_drives, load_drive

# RecordedDrive v2 arrays a training run reads; older readers leave them out, older drives lack them.
_V2_ARRAYS = ("session", "cell_capacity_ah", "ocv_soc", "ocv_v", "current_true")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch and force deterministic kernels (same seed -> same model bytes)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(os.environ.get("BMS_AI_TRAIN_THREADS", "1")))


def next_version(out: Path, name: str) -> int:
    """The next free version number for model ``name`` in ``out``."""
    entries, _ = read_manifest(out)
    return 1 + max((e.version for e in entries if e.name == name), default=0)


def data_fingerprint(paths: list[Path]) -> str:
    """SHA-256 over the drive files used, recorded in the model's provenance."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.name).encode())
        for f in sorted(Path(p).glob("*")):
            if f.is_file() and f.suffix in (".npz", ".parquet", ".json"):
                h.update(sha256_file(f).encode())
    return h.hexdigest()


def load_training_drive(path: Path) -> RecordedDrive:
    """``load_drive`` with the v2 arrays always present as attributes (None where the drive has none).

    Training must see the drive's true OCV curve and sessions even when the
    dataset reader in use predates them, so they are read from drive.npz here.
    """
    d = load_drive(path)
    npz = Path(path) / "drive.npz"
    missing = [k for k in _V2_ARRAYS if getattr(d, k, None) is None]
    found = {}
    if missing and npz.exists():
        with np.load(npz) as z:
            found = {k: np.asarray(z[k]) for k in missing if k in z.files}
    for k in missing:
        setattr(d, k, found.get(k))
    return d


def load_training_drives(dirs: list[str | Path], chemistry: str) -> tuple[list[RecordedDrive], list[Path]]:
    """All drives of one chemistry under ``dirs`` (sorted by path), with their directories.

    Refuses anything from an evaluation suite: a model must never see the drives it is scored on.
    """
    paths = find_drives(list(dirs))
    bad = [p for p in paths if "eval" in Path(p).parts]
    if bad:
        raise ValueError(f"{bad[0]}: drives of the eval suite are never used for training or calibration")
    drives, kept = [], []
    for p in sorted(paths):
        d = load_training_drive(p)
        if d.chemistry == chemistry:
            drives.append(d)
            kept.append(Path(p))
    return drives, kept


def session_of(d: RecordedDrive) -> np.ndarray:
    """Session index per sample (one session for drives without the v2 array)."""
    s = getattr(d, "session", None)
    return np.zeros(len(d.t), dtype=np.int32) if s is None else np.asarray(s, dtype=np.int32)


def constant_rate_runs(t: np.ndarray, session: np.ndarray | None, max_gap: float) -> list[tuple[int, int, float, bool]]:
    """Stretches of constant sample period: (start, stop, dt, restart); a restart is one sample on its own.

    A run [start, stop) continues sample start - 1 at period dt; a history
    restarts at a session change, a gap > ``max_gap`` or a non-increasing time.
    """
    dt = np.diff(t)
    brk = (dt <= 0) | (dt > max_gap)
    if session is not None:
        brk |= np.diff(session) != 0
    key = np.where(brk, -1.0, np.round(dt, 6))
    # a new run wherever the period changes or the history restarts
    edges = np.flatnonzero(np.diff(key) != 0) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [len(key)]])
    out: list[tuple[int, int, float, bool]] = [(0, 1, 0.0, True)]
    for a, b in zip(starts, stops):
        if b <= a:
            continue
        if key[a] < 0:  # each breaking step restarts on its own sample
            out.extend((k + 1, k + 2, 0.0, True) for k in range(a, b))
        else:
            out.append((a + 1, b + 1, float(key[a]), False))
    return out


def first_order(x: np.ndarray, alpha: float, y_prev: np.ndarray) -> np.ndarray:
    """y_k = alpha y_(k-1) + (1 - alpha) x_k over a constant-rate run, vectorised in blocks.

    Within a block y_k = alpha^k (y_prev + sum_j (1 - alpha) x_j alpha^-j); the
    block length keeps alpha^-k below e^30, so the sums stay exact to ~1e-13.
    """
    b = 1.0 - alpha
    if alpha < 1e-12:  # the branch forgets within one sample
        y = b * x
        y[0] += alpha * y_prev
        return y
    c = -math.log(alpha)
    block = max(1, int(30.0 / c))
    y = np.empty_like(x)
    for s in range(0, len(x), block):
        xs = x[s:s + block]
        k = np.arange(1, len(xs) + 1, dtype=np.float64)
        if xs.ndim == 2:
            k = k[:, None]
        y[s:s + block] = (y_prev + np.cumsum(b * xs * np.exp(c * k), axis=0)) * np.exp(-c * k)
        y_prev = y[s + len(xs) - 1]
    return y


def lowpass(t: np.ndarray, x: np.ndarray, tau: float, session: np.ndarray | None = None,
            init: str = "first", max_gap: float = 30.0) -> np.ndarray:
    """Causal first-order low-pass y += (1 - exp(-dt/tau)) (x - y), exact for any sample period.

    The history restarts at a session change, a gap > ``max_gap`` or a
    non-increasing time: at ``x`` ("first", steady state) or 0 ("zero", a relaxed
    RC branch like the classical model's after a restart). ``x``: (T,) or (T, n).
    """
    x = np.asarray(x, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    y = np.empty_like(x)
    if len(t) == 0:
        return y
    prev = x[0]
    for a, b, dt, restart in constant_rate_runs(t, session, max_gap):
        if restart:
            prev = x[a].copy() if init == "first" else np.zeros_like(x[a])
            y[a] = prev
            continue
        y[a:b] = first_order(x[a:b], math.exp(-dt / tau), prev)
        prev = y[b - 1]
    return y


def gauss_markov(t: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator, sigma: float,
                 tau: float) -> np.ndarray:
    """A stationary Gauss-Markov process (sigma, correlation time tau) at times t: (T, *shape).

    Exact on a grid of tau/20 (linear in between), so its cost does not depend on the sample rate.
    """
    t = np.asarray(t, dtype=np.float64)
    if not len(t):
        return np.zeros((0, *shape))
    step = tau / 20.0
    grid = t[0] + step * np.arange(int(np.ceil((t[-1] - t[0]) / step)) + 2)
    phi = math.exp(-step / tau)
    w = rng.standard_normal((len(grid), *shape))
    x0 = sigma * w[0]
    x = first_order(w[1:] * (sigma * math.sqrt(1.0 - phi * phi) / (1.0 - phi)), phi, x0)
    x = np.concatenate([x0[None] if np.ndim(x0) else np.array([x0]), x])
    if x.ndim == 1:
        return np.interp(t, grid, x)
    return np.stack([np.interp(t, grid, x[:, j]) for j in range(x.shape[1])], axis=1)


def smooth(t: np.ndarray, x: np.ndarray, tau: float, session: np.ndarray | None = None,
           max_gap: float = 30.0) -> np.ndarray:
    """Zero-phase low-pass: ``lowpass`` forward, then backward (no lag between a signal and its slow part)."""
    fwd = lowpass(t, x, tau, session, "first", max_gap)
    rs = None if session is None else session[::-1]
    return lowpass(-t[::-1], fwd[::-1], tau, rs, "first", max_gap)[::-1]


def export_onnx(module, example, out_path: Path, input_names: list[str], output_names: list[str]) -> None:
    """Legacy exporter (dynamo=False) so the batch axis stays dynamic."""
    import torch

    module.eval()
    dyn = {n: {0: "batch"} for n in input_names + output_names}
    with torch.no_grad():
        torch.onnx.export(module, example, str(out_path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dyn, opset_version=17, dynamo=False)


def register(out: Path, *, name: str, version: int, file: str, task: str, chemistry: str,
             inputs: list[TensorSpec], outputs: list[TensorSpec], feature_version: str, normalisation: dict,
             domain: dict, provenance: dict, metrics: dict, params: int, extra: dict | None = None) -> ModelEntry:
    """Hash the exported file and add its entry to the manifest in ``out``."""
    entry = ModelEntry(name=name, version=version, file=file, sha256=sha256_file(out / file), task=task,
                       chemistry=chemistry, inputs=inputs, outputs=outputs, feature_version=feature_version,
                       normalisation=normalisation, domain=domain,
                       provenance=dict(provenance, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                       metrics=metrics, params=params, extra=extra or {})
    upsert_entry(out, entry)
    return entry
