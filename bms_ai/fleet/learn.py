"""Fleet learning: a cell type's OCV curve from many vehicles' pseudo-labelled rests, shipped as a model version.

Where the SOC error on an unfamiliar cell type comes from (measured, docs/fleet_learning.md):
the estimator trusts its voltage only as far as it knows the cell's OCV curve. With the
chemistry's family prior (a band of 40-180 mV) a held-out cell's rest voltage is no anchor and
the estimate is Coulomb counting, whose gain, offset and capacity errors then grow unchecked.
Given the cell's own curve (``--ocv datasheet``), rest anchors and voltage corrections work.
The fleet has that curve in its data: every relaxed rest of every vehicle is a point
(pseudo-labelled SOC, rest voltage) on it.

``learn`` fits, per cell type, a monotone OCV table with an honest band from those points
and writes a candidate model directory: the current models plus a new version of the SOC
model whose signed entry carries the curves (``extra.ocv_curves``; the estimator uses them
for packs of that cell type like a pack-config OCV curve, ``PackEstimator(cell_type=...)``).
The overpotential network is carried over unchanged (its bytes, a new version number).

Leave-one-out labels: a rest is also an anchor of the pseudo-labeller, so its label leans
on the very curve being fitted. The point's SOC is therefore the smoother's estimate
*without* that rest's own anchor (the Gaussian cavity of the posterior), i.e. Coulomb
counting from the other anchors. Fitting then relabelling with the fitted curve (``passes``)
lets the other rests anchor the counting.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from bms_ai.chemistry.ocv import OCVCurve, load_ocv
from bms_ai.chemistry.registry import get_chemistry
from bms_ai.core.cliargs import nonneg_float, out_dir
from bms_ai.estimation.ocvmodel import FLEET_OCV_KEY, KNOTS
from bms_ai.fleet.labels import LabelConfig, Labels, find_anchors, label_drive
from bms_ai.models.manifest import ModelEntry, read_manifest
from bms_ai.models.runtime import default_model_dir

GRID = np.linspace(0.0, 1.0, 41)   # the learned table's SOC points


def pseudonym(drive_or_name) -> str:
    """A stable pseudonym of a recorded period (its name hashed): what provenance may list instead of a VIN."""
    name = drive_or_name if isinstance(drive_or_name, str) else drive_or_name.name
    return hashlib.sha256(str(name).encode()).hexdigest()[:12]


@dataclass
class LabelledVehicle:
    """One vehicle's recorded period with its pseudo-labels (never its truth) and what the cloud may know of it."""

    drive: object                    # bms_ai.sim.dataset.RecordedDrive (measured arrays used only)
    labels: Labels
    vehicle: str = ""                # pseudonym; '' -> a hash of the drive name
    cell_type: str = ""              # '' -> meta variant / cell_set

    def __post_init__(self) -> None:
        """Fill the pseudonym and the cell type from the drive when the caller gave none."""
        if not self.vehicle:
            self.vehicle = pseudonym(self.drive)
        if not self.cell_type:
            self.cell_type = self.drive.cell_type


@dataclass(frozen=True)
class LearnConfig:
    """Fit settings; every value says what it guards against."""

    passes: int = 2                  # fit, relabel with the fit, fit again
    max_point_sigma: float = 0.15    # a rest whose leave-one-out SOC is less sure than this says little (weights do the rest)
    relax_sigma_v: float = 0.005     # a 30-min rest / first sample after a park is not fully relaxed
    sensor_sigma_v: float = 0.003    # cell voltage sensor
    smooth_v: float = 0.004          # second difference of (curve - family curve) per grid step: shapes vary slowly
    prior_scale: float = 2.0         # where no rest lies, the family curve with twice its band
    band_floor_v: float = 0.004      # never claim the curve better than this
    min_points: int = 20             # fewer rests of a cell type: no curve for it
    outlier_z: float = 4.0           # points this far off the first fit are dropped
    only_unfamiliar: bool = True     # learn only cell types the current model never saw (familiar ones stay as they are)
    min_chi: float = 0.5             # residuals smaller than claimed shrink the band, at most to half
    label: LabelConfig = field(default_factory=LabelConfig)


@dataclass
class RestPoints:
    """Relaxed rest voltages of one cell type with their leave-one-out SOC (all cells, all vehicles)."""

    v: np.ndarray
    soc: np.ndarray
    sigma: np.ndarray
    vehicles: list[str]


def rest_points(veh: LabelledVehicle, cfg: LearnConfig = LearnConfig()) -> RestPoints:
    """The vehicle's relaxed rests and post-park samples per cell: voltage, SOC without that rest's anchor, sigma."""
    d, lab = veh.drive, veh.labels
    loose = replace(cfg.label, max_anchor_sigma=np.inf)
    found = find_anchors(d.t, d.current, d.cell_v, d.chemistry, d.capacity_ah, d.session, None, 0.0, loose)
    own = {}
    for a in lab.anchors:           # anchors the labels used, per (index, cell): combined precision and mean
        p, m = own.get((a.index, a.cell), (0.0, 0.0))
        own[(a.index, a.cell)] = (p + 1.0 / a.sigma**2, m + a.soc / a.sigma**2)
    v, s, sg = [], [], []
    for a in found:
        if a.kind == "full":
            continue
        i, k = a.index, a.cell
        volt = float(np.mean(d.cell_v[max(0, i - 4):i + 1, k])) if a.kind == "rest" else float(d.cell_v[i, k])
        mu, var = float(lab.soc[i, k]), float(lab.sigma[i, k]) ** 2
        if (i, k) in own:           # remove the rest's own anchor: the Gaussian cavity of the posterior
            p_a, pm_a = own[(i, k)]
            p_c = 1.0 / max(var, 1e-12) - p_a
            if p_c <= 1e-6:
                continue            # nothing but the anchor itself knew this SOC
            mu, var = (mu / max(var, 1e-12) - pm_a) / p_c, 1.0 / p_c
        v.append(volt)
        s.append(mu)
        sg.append(np.sqrt(var))
    keep = np.asarray(sg) <= cfg.max_point_sigma if sg else np.zeros(0, bool)
    return RestPoints(np.asarray(v)[keep], np.asarray(s)[keep], np.asarray(sg)[keep], [veh.vehicle])


def _merge(points: list[RestPoints]) -> RestPoints:
    """All vehicles' points of one cell type as one set."""
    return RestPoints(np.concatenate([p.v for p in points]), np.concatenate([p.soc for p in points]),
                      np.concatenate([p.sigma for p in points]), sorted({x for p in points for x in p.vehicles}))


@dataclass
class FleetOcv:
    """A learned OCV table with its band on ``KNOTS`` and how it was fitted."""

    cell_type: str
    chemistry: str
    soc: np.ndarray
    v: np.ndarray
    band_v: np.ndarray
    stats: dict

    @property
    def curve(self) -> OCVCurve:
        """The table as the estimator's curve type."""
        return OCVCurve(self.soc, self.v, "fleet")

    def to_dict(self) -> dict:
        """The entry form ``ocvmodel.ocv_model_from_entry`` reads."""
        return {"soc": self.soc.round(5).tolist(), "v": self.v.round(5).tolist(),
                "band_v": self.band_v.round(5).tolist(), "chemistry": self.chemistry, **self.stats}


def _design(soc: np.ndarray) -> np.ndarray:
    """Rows mapping the parameters [v0, increments] to the curve at ``soc`` (linear interpolation on GRID)."""
    n = len(GRID)
    tri = np.tril(np.ones((n, n)))
    j = np.clip(np.searchsorted(GRID, soc, side="right") - 1, 0, n - 2)
    w = (soc - GRID[j]) / (GRID[j + 1] - GRID[j])
    interp = np.zeros((len(soc), n))
    interp[np.arange(len(soc)), j] = 1.0 - w
    interp[np.arange(len(soc)), j + 1] = w
    return interp @ tri


def _family_band(chemistry: str, soc: np.ndarray) -> np.ndarray:
    """The chemistry's family band (RMS spread of known cell sets) at ``soc``."""
    b = np.atleast_1d(np.asarray(get_chemistry(chemistry).ocv_family_band_v, dtype=float))
    return np.interp(soc, np.linspace(0, 1, b.size), b) if b.size > 1 else np.full_like(soc, b[0])


def _solve(pts: RestPoints, chemistry: str, cfg: LearnConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Monotone weighted least squares: rests, a smooth deviation from the family curve, a weak family prior.

    Returns the parameters, the points' residuals over their sigma, and the (unconstrained) parameter covariance.
    """
    from scipy.optimize import lsq_linear

    chem = get_chemistry(chemistry)
    ref = load_ocv(chem.name)
    slope = np.asarray(ref.slope(np.clip(pts.soc, 0, 1)))
    sig = np.sqrt(cfg.sensor_sigma_v**2 + cfg.relax_sigma_v**2 + (chem.hysteresis_gap_v / 2) ** 2
                  + (slope * pts.sigma) ** 2)
    a_pts = _design(np.clip(pts.soc, 0, 1)) / sig[:, None]
    b_pts = pts.v / sig
    tri = np.tril(np.ones((len(GRID), len(GRID))))
    refg = ref(GRID)
    band = cfg.prior_scale * _family_band(chem.name, GRID)
    d2 = np.diff(np.eye(len(GRID)), 2, axis=0)
    a = np.vstack([a_pts, (d2 @ tri) / cfg.smooth_v, tri / band[:, None]])
    b = np.concatenate([b_pts, d2 @ refg / cfg.smooth_v, refg / band])
    lo = np.r_[-np.inf, np.full(len(GRID) - 1, 1e-6)]
    res = lsq_linear(a, b, bounds=(lo, np.full(len(GRID), np.inf)), method="bvls")
    cov = np.linalg.pinv(a.T @ a)
    return res.x, (a_pts @ res.x - b_pts), cov


def fit_ocv(points: RestPoints, chemistry: str, cell_type: str, cfg: LearnConfig = LearnConfig()) -> FleetOcv:
    """The cell type's OCV table and band from its rest points (outliers beyond ``outlier_z`` dropped once)."""
    if len(points.v) < cfg.min_points:
        raise ValueError(f"{cell_type}: {len(points.v)} usable rests, need >= {cfg.min_points}")
    x, z, _ = _solve(points, chemistry, cfg)
    ok = np.abs(z) <= cfg.outlier_z
    pts = RestPoints(points.v[ok], points.soc[ok], points.sigma[ok], points.vehicles)
    x, z, cov = _solve(pts, chemistry, cfg)
    tri = np.tril(np.ones((len(GRID), len(GRID))))
    v = tri @ x
    chi = float(np.sqrt(np.mean(z**2))) if len(z) else 1.0
    m = _design(KNOTS)
    var_k = np.einsum("ij,jk,ik->i", m, cov, m) * max(chi, cfg.min_chi) ** 2
    band = np.sqrt(var_k + cfg.band_floor_v**2)
    stats = {"rests": int(ok.sum()), "dropped": int((~ok).sum()), "vehicles": points.vehicles,
             "rms_z": round(chi, 3), "soc_span": [round(float(pts.soc.min()), 3), round(float(pts.soc.max()), 3)]}
    return FleetOcv(cell_type, get_chemistry(chemistry).name, GRID.copy(), v, band, stats)


def _add_between_vehicles(fit: FleetOcv, per_vehicle: list[RestPoints], chemistry: str, cfg: LearnConfig) -> None:
    """Widen the band by how much vehicles disagree (each vehicle's labels share its own capacity error).

    The points of one vehicle are not independent: its cells' capacity estimates scale every
    label of that vehicle alike, so the band from the pooled fit alone shrinks too fast. With
    >= 2 vehicles of enough rests, each is fitted alone and the spread of those fits over the
    square root of their number is added (a random effect per vehicle).
    """
    alone = []
    for p in per_vehicle:
        try:
            alone.append(fit_ocv(p, chemistry, fit.cell_type, replace(cfg, min_points=cfg.min_points // 2)))
        except ValueError:
            continue
    if len(alone) < 2:
        fit.stats["between_vehicles"] = "not measured (< 2 vehicles with enough rests)"
        return
    v = np.array([np.interp(KNOTS, a.soc, a.v) for a in alone])
    sd = v.std(axis=0, ddof=1) / np.sqrt(len(alone))
    fit.band_v = np.sqrt(fit.band_v**2 + sd**2)
    fit.stats["between_vehicles_mv"] = round(1e3 * float(np.median(sd)), 1)


def _add_capacity_scale(fit: FleetOcv, vehicles: list[LabelledVehicle]) -> None:
    """Widen the band by the labels' capacity uncertainty, which no number of rests averages away.

    Between full charges a label is 1 - (charge out) / capacity, so the labels of every rest at
    SOC s share a relative error (1 - s) x sigma_Q/Q; a curve fitted to them is that much
    stretched along SOC (in volts: times the slope). Rests and Coulomb counting alone cannot
    tell a stretched curve with another capacity from the true one.
    """
    rel = np.concatenate([v.labels.capacity_sigma_ah / v.labels.capacity_ah for v in vehicles])
    q = float(np.median(rel))
    slope = np.interp(KNOTS, fit.soc, np.gradient(fit.v, fit.soc))
    sys = slope * (1.0 - KNOTS) * q
    fit.band_v = np.sqrt(fit.band_v**2 + sys**2)
    fit.stats["capacity_rel_sigma"] = round(q, 4)


def relabel(veh: LabelledVehicle, fit: FleetOcv, cfg: LearnConfig) -> LabelledVehicle:
    """The vehicle labelled again with its cell type's fitted curve (its band as the curve error)."""
    lc = replace(cfg.label, ocv_sigma_v=float(np.median(fit.band_v)))
    return replace(veh, labels=label_drive(veh.drive, ocv=fit.curve, cfg=lc))


def prior_band(chemistry: str, cfg: LearnConfig = LearnConfig()) -> np.ndarray:
    """The widest band a learned curve gets, on the estimator's knots: twice the family band (at least the floor)."""
    return np.maximum(cfg.prior_scale * _family_band(chemistry, KNOTS), cfg.band_floor_v)


def _learn_type(ct: str, vs: list[LabelledVehicle], chem: str, cfg: LearnConfig, log) -> FleetOcv | None:
    """Fit, relabel with the fit, fit again (``cfg.passes``); None with a log line when the rests are too few."""
    fit = None
    # Only the end of a full charge says where SOC 1 is without an OCV curve. Without one, every label came
    # from rests read through the family curve, so the fit returns that curve and its small residuals say
    # nothing about its error: the band stays the prior's (twice the family band), never tighter.
    curve_free = sum(a.kind == "full" for v in vs for a in v.labels.anchors)
    prior = prior_band(chem, cfg)
    for k in range(cfg.passes):
        if fit is not None:
            vs = [relabel(v, fit, cfg) for v in vs]
        per_vehicle = [rest_points(v, cfg) for v in vs]
        try:
            fit = fit_ocv(_merge(per_vehicle), chem, ct, cfg)
        except ValueError as exc:
            log(f"[learn] {exc}: skipped")
            return None
        _add_between_vehicles(fit, per_vehicle, chem, cfg)
        _add_capacity_scale(fit, vs)
        # at most the prior's band; without a curve-free anchor exactly the prior's
        fit.band_v = np.minimum(fit.band_v, prior) if curve_free else prior.copy()
        fit.stats["curve_free_anchors"] = int(curve_free)
        log(f"[learn] {ct} pass {k + 1}: {fit.stats['rests']} rests from {len(vs)} vehicles, "
            f"band {1e3 * fit.band_v.min():.0f}-{1e3 * fit.band_v.max():.0f} mV, rms z {fit.stats['rms_z']}")
    return fit


def learn_curves(vehicles: list[LabelledVehicle], cfg: LearnConfig = LearnConfig(), log=print,
                 familiar: set[str] = frozenset()) -> dict[str, FleetOcv]:
    """Per cell type (with enough rests, not in ``familiar``): the learned OCV; skipped types get a log line."""
    by_type: dict[str, list[LabelledVehicle]] = {}
    for v in vehicles:
        if v.cell_type in familiar:
            continue
        by_type.setdefault(v.cell_type, []).append(v)
    out: dict[str, FleetOcv] = {}
    for ct, vs in sorted(by_type.items()):
        chem = get_chemistry(vs[0].drive.chemistry).name
        if not ct or any(get_chemistry(v.drive.chemistry).name != chem for v in vs):
            log(f"[learn] cell type {ct!r}: no name or mixed chemistries, skipped")
            continue
        fit = _learn_type(ct, vs, chem, cfg, log)
        if fit is not None:
            out[ct] = fit
    return out


def current_entries(model_dir: Path) -> dict[tuple[str, str], ModelEntry]:
    """The newest entry of each (task, chemistry) slot in a model directory."""
    entries, _ = read_manifest(model_dir)
    out: dict[tuple[str, str], ModelEntry] = {}
    for e in entries:
        if e.key not in out or e.version > out[e.key].version:
            out[e.key] = e
    return out


def write_candidate(curves: dict[str, FleetOcv], model_dir: Path, out: Path, provenance: dict) -> list[Path]:
    """The current model directory copied to ``out`` plus, per chemistry, a new SOC model version with the curves.

    Returns the new model files (each with its ``.onnx.json`` entry beside it).
    """
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: not empty (a candidate directory is written once)")
    shutil.copytree(model_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".tuf", "*.part", "gate.json"))
    cur = current_entries(model_dir)
    written = []
    for chem in sorted({c.chemistry for c in curves.values()}):
        base = cur.get(("soc", chem))
        if base is None:
            raise ValueError(f"{model_dir}: no SOC model for {chem} to carry the learned curves")
        version = base.version + 1
        new_file = f"{base.name}_v{version}.onnx"
        shutil.copyfile(model_dir / base.file, out / new_file)
        ocv = dict(base.extra.get(FLEET_OCV_KEY) or {})
        ocv.update({ct: f.to_dict() for ct, f in curves.items() if f.chemistry == chem})
        entry = replace(base, version=version, file=new_file,
                        extra={**base.extra, FLEET_OCV_KEY: ocv},
                        provenance={**provenance, "base_model": f"{base.name}@{base.version}",
                                    "overpotential": f"unchanged from {base.name}@{base.version}",
                                    "cell_types": sorted(ct for ct, f in curves.items() if f.chemistry == chem)})
        (out / f"{new_file}.json").write_text(json.dumps(entry.to_dict(), indent=1) + "\n")
        written.append(out / new_file)
    return written


def label_vehicles(drives: list, cfg: LearnConfig = LearnConfig()) -> list[LabelledVehicle]:
    """Pseudo-labels of recorded drives (generic OCV curve, as the pipeline makes them)."""
    return [LabelledVehicle(d, label_drive(d, cfg=cfg.label)) for d in drives]


def learn(vehicles: list[LabelledVehicle], out: str | Path, model_dir: str | Path | None = None,
          cfg: LearnConfig = LearnConfig(), log=print) -> Path:
    """Fleet labels -> candidate model directory (current models + new SOC versions with learned OCV curves).

    Raises ValueError when nothing could be learned (no cell type with enough rests).
    """
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    out = Path(out)
    familiar: set[str] = set()
    if cfg.only_unfamiliar:
        for e in current_entries(model_dir).values():
            familiar |= set(e.provenance.get("variants", [])) | set(e.provenance.get("val_variants", []))
    curves = learn_curves(vehicles, cfg, log, familiar)
    if not curves:
        raise ValueError("no cell type had enough relaxed rests to learn an OCV curve")
    prov = {"trainer": "bms_ai.fleet.learn", "learned": "OCV curve per cell type from pseudo-labelled rests",
            "vehicles": sorted({v.vehicle for v in vehicles}), "drives": len(vehicles),
            "passes": cfg.passes, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    files = write_candidate(curves, model_dir, out, prov)
    summary = {"base_dir": str(model_dir), "models": [f.name for f in files], "provenance": prov,
               "curves": {ct: {"chemistry": f.chemistry, **f.stats,
                               "band_mv": [round(1e3 * float(f.band_v.min()), 1), round(1e3 * float(f.band_v.max()), 1)]}
                          for ct, f in curves.items()}}
    (out / "learn.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(f"[learn] candidate {out}: {', '.join(f.name for f in files)}")
    return out


class TrainCommand:
    """`bms-ai fleet train DRIVES... --out DIR`: pseudo-label the vehicles' periods and learn a candidate."""

    @staticmethod
    def add_arguments(p) -> None:
        """Drives in, candidate directory out."""
        p.add_argument("drives", nargs="+", help="recorded vehicle periods (RecordedDrive directories or parents)")
        p.add_argument("--out", type=out_dir, required=True, help="candidate model directory to write (new or empty)")
        p.add_argument("--models", default="", help="current model directory ('' = the shipped models)")
        p.add_argument("--rate-hz", type=nonneg_float, default=1.0, help="resample the drives to this rate first (fleet: 1 Hz; 0: as recorded)")
        p.add_argument("--all-types", action="store_true", help="learn curves for familiar cell types as well")

    @staticmethod
    def run(args) -> int:
        """Label, learn, write; a one-line error on bad input."""
        import sys

        from bms_ai.sim.dataset import find_drives, load_drive, resample_drive

        cfg = LearnConfig(only_unfamiliar=not args.all_types)
        try:
            drives = [resample_drive(load_drive(p), args.rate_hz) for p in find_drives(args.drives)]
            learn(label_vehicles(drives, cfg), args.out, args.models or None, cfg)
        except (ValueError, FileNotFoundError, KeyError) as exc:
            print(f"bms-ai fleet train: {exc}", file=sys.stderr)
            return 2
        return 0
