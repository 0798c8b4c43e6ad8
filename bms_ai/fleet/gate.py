"""The evaluation gate: a candidate model directory against the current one on held-out vehicles, then publication.

A candidate from ``bms_ai.fleet.learn`` reaches vehicles only if, on vehicles whose data
were not used to learn it (simulation: truth SOC known), it is

- not worse on familiar cells (cell types the factory models were trained on): pooled
  RMSE and p95 within ``GateRule.familiar_tol_*`` of the current models', and
- better on unfamiliar cells (held-out cell types) by ``GateRule.unfamiliar_margin``.

The numbers come from the same harness and metrics as ``bms-ai evaluate``
(``bms_ai.estimation.evaluate``: session by session with the estimator's own stored
state, RMSE / p95 / max over every cell and sample), with Coulomb counting from the true
start alongside as the reference. The verdict, its reasons and the sha256 of every
candidate file are written to ``gate.json`` in the candidate directory; ``publish``
signs and publishes only the files of an accepted verdict, unchanged since (TufPublisher,
keys from files).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bms_ai.core.cliargs import nonneg_float
from bms_ai.estimation.baselines import EvalSetup, ShippedEstimator
from bms_ai.estimation.evaluate import (
    PERTURBATIONS,
    VARIANTS,
    RunResult,
    drive_classes,
    marks,
    pack_info,
    pooled,
    run_methods,
    session_bounds,
)
from bms_ai.fleet.learn import pseudonym
from bms_ai.sim.dataset import load_drive, resample_drive

GATE_FILE = "gate.json"
CURRENT, CANDIDATE, REFERENCE = "current", "candidate", "cc_oracle"


class FleetEstimator(ShippedEstimator):
    """The shipped estimator of one model directory, told the pack's cell type (as a vehicle of the fleet runs it)."""

    def __init__(self, pack, setup: EvalSetup, *, label: str, model_dir: str, cell_type: str) -> None:
        """``label`` names the method in the results (current / candidate)."""
        super().__init__(pack, replace(setup, model_dir=Path(model_dir)))
        self.name = label
        self.cell_type = cell_type

    def _new(self, initial_soc):
        return self._cls(self.pack.chemistry, self.pack.capacity_ah, self.models, initial_soc=initial_soc,
                         rul=self.rul, cell_type=self.cell_type)

    def info(self) -> dict:
        """The harness's info plus the OCV the estimator ended up with (fleet curve or family prior)."""
        est = self.est.soc_est
        return {**super().info(), "cell_type": self.cell_type, "ocv": est.ocv.source if est is not None else ""}


def gate_drive(path: str, current_dir: str, candidate_dir: str, rate_hz: float = 1.0) -> RunResult:
    """One held-out vehicle: current and candidate estimators and CC from the true start, evaluate's metrics."""
    d = resample_drive(load_drive(path), rate_hz)
    pack = pack_info(d, "chemistry")
    base = VARIANTS[0]
    x = PERTURBATIONS[base.kind](d, base)
    ct = d.cell_type
    names = [functools.partial(FleetEstimator, label=CURRENT, model_dir=current_dir, cell_type=ct),
             functools.partial(FleetEstimator, label=CANDIDATE, model_dir=candidate_dir, cell_type=ct), REFERENCE]
    stats, infos, _, _ = run_methods(pack, EvalSetup(rate_hz=rate_hz), names, x, d.soc, marks(d), plot_points=2)
    r = RunResult(d.name, d.chemistry, base.name, base.kind, drive_classes(d.meta), bool(d.meta.get("held_out", False)),
                  ct, None, False, 0.0, float(d.t[-1] - d.t[0]), len(d.t), len(session_bounds(x.session)), d.n_cells)
    from bms_ai.estimation.evaluate import MethodRun

    for key, st in stats.items():
        r.methods[key] = MethodRun(key, st.result(d.t), st.sse, st.count, st.hist, st.sets, infos[key])
    r.trace = {"vehicle": pseudonym(d)}
    return r


@dataclass(frozen=True)
class GateRule:
    """When a candidate may be published (fractions of SOC, 0.01 = 1 point)."""

    familiar_tol_abs: float = 0.001    # familiar cells: RMSE / p95 may not rise by more than this ...
    familiar_tol_rel: float = 0.05     # ... plus this share of the current value (run-to-run noise)
    unfamiliar_margin: float = 0.2     # unfamiliar cells: pooled RMSE at least this share lower


def _metrics(runs: list[RunResult], method: str) -> dict | None:
    p = pooled(runs, method)
    if p is None:
        return None
    return {k: p[k] for k in ("rmse", "p95", "max", "mean_run_rmse", "runs")}


def summarise(runs: list[RunResult]) -> dict:
    """Per class (familiar / unfamiliar) and per cell type: current, candidate and reference metrics."""
    out: dict = {"classes": {}, "cell_types": {}}
    for cls, sel in (("familiar", [r for r in runs if not r.held_out]), ("unfamiliar", [r for r in runs if r.held_out])):
        if sel:
            out["classes"][cls] = {m: _metrics(sel, m) for m in (CURRENT, CANDIDATE, REFERENCE)}
    for ct in sorted({r.cell_set for r in runs}):
        sel = [r for r in runs if r.cell_set == ct]
        out["cell_types"][ct] = {"held_out": sel[0].held_out,
                                 **{m: _metrics(sel, m) for m in (CURRENT, CANDIDATE, REFERENCE)}}
    return out


def decide(summary: dict, rule: GateRule = GateRule()) -> list[str]:
    """Why the candidate may not be published ([] = accepted)."""
    why = []
    fam = summary["classes"].get("familiar")
    if fam:
        for k in ("rmse", "p95"):
            cur, cand = fam[CURRENT][k], fam[CANDIDATE][k]
            if cand > cur * (1 + rule.familiar_tol_rel) + rule.familiar_tol_abs:
                why.append(f"familiar cells: {k} {100 * cand:.2f} % vs current {100 * cur:.2f} % (worse)")
    unf = summary["classes"].get("unfamiliar")
    if not unf:
        why.append("no held-out vehicles with unfamiliar cells: nothing shows a gain")
    else:
        cur, cand = unf[CURRENT]["rmse"], unf[CANDIDATE]["rmse"]
        if not cand <= cur * (1 - rule.unfamiliar_margin):
            why.append(f"unfamiliar cells: RMSE {100 * cand:.2f} % vs current {100 * cur:.2f} % "
                       f"(needs >= {100 * rule.unfamiliar_margin:.0f} % lower)")
    return why


def file_hashes(candidate_dir: Path, names: list[str]) -> dict[str, str]:
    """sha256 of each named file (a model and its entry) in the candidate directory."""
    return {n: hashlib.sha256((candidate_dir / n).read_bytes()).hexdigest() for n in names}


def _new_files(candidate_dir: Path) -> list[str]:
    """The candidate's new models and their entries (learn.json names the models)."""
    info = json.loads((candidate_dir / "learn.json").read_text())
    return [f for m in info["models"] for f in (m, f"{m}.json")]


def compare(paths: list[Path], current: Path, candidate: Path, rate_hz: float, jobs: int, log) -> list[RunResult]:
    """Every vehicle through ``gate_drive``; in parallel worker processes when ``jobs`` > 1."""
    args = [(str(p), str(current), str(candidate), rate_hz) for p in paths]
    if jobs <= 1 or len(args) <= 1:
        out = []
        for a in args:
            out.append(gate_drive(*a))
            log(_line(out[-1]))
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        out = list(pool.map(gate_drive, *zip(*args)))
    for r in out:
        log(_line(r))
    return out


def vehicle_rows(runs: list[RunResult]) -> list[dict]:
    """One row per vehicle: its class, hours and each method's RMSE / p95 / max (what gate.json and the report show)."""
    return [{"drive": r.drive, "vehicle": r.trace.get("vehicle", ""), "cell_type": r.cell_set,
             "class": "unfamiliar" if r.held_out else "familiar", "hours": r.duration_s / 3600,
             **{k: _finite(m.metrics) for k, m in r.methods.items()}} for r in runs]


def _line(r: RunResult) -> str:
    errs = " ".join(f"{k} {100 * m.metrics['rmse']:.2f}" for k, m in r.methods.items())
    return f"[gate] {r.drive} ({r.cell_set}, {'unfamiliar' if r.held_out else 'familiar'}) RMSE % {errs}"


def gate(candidate_dir: str | Path, drives: list[str | Path], current_dir: str | Path | None = None,
         rule: GateRule = GateRule(), rate_hz: float = 1.0, jobs: int = 1, log=print) -> dict:
    """Evaluate, decide and write ``gate.json``; returns its content (``accepted``, ``reasons``, metrics).

    Vehicles whose data the candidate learned from (its provenance lists their pseudonyms)
    are left out and named: a gate on training vehicles proves nothing.
    """
    from bms_ai.sim.dataset import find_drives

    candidate_dir = Path(candidate_dir)
    info = json.loads((candidate_dir / "learn.json").read_text())
    current = Path(current_dir or info["base_dir"])
    used = set(info["provenance"].get("vehicles", []))
    paths, skipped = [], []
    for p in find_drives([str(x) for x in drives]):
        (skipped if pseudonym_of_path(p) in used else paths).append(p)
    if not paths:
        raise ValueError("no held-out vehicles to gate on (every drive given was used to learn)")
    runs = compare(paths, current, candidate_dir, rate_hz, jobs, log)
    vehicles = vehicle_rows(runs)
    record = write_record(candidate_dir, summarise(runs), rule, vehicles,
                          {"current_dir": str(current), "rate_hz": rate_hz,
                           "skipped_training_vehicles": [p.name for p in skipped]})
    log(f"[gate] {'ACCEPTED' if record['accepted'] else 'REFUSED: ' + '; '.join(record['reasons'])}")
    return record


def write_record(candidate_dir: Path, summary: dict, rule: GateRule, vehicles: list[dict], extra: dict) -> dict:
    """Decide on ``summary`` and write ``gate.json`` with the sha256 of the files the verdict is about."""
    reasons = decide(summary, rule)
    record = {"accepted": not reasons, "reasons": reasons, "rule": asdict(rule), **extra, "summary": summary,
              "vehicles": vehicles, "files": file_hashes(Path(candidate_dir), _new_files(Path(candidate_dir)))}
    (Path(candidate_dir) / GATE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def _finite(m: dict) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in m.items()
            if k in ("rmse", "p95", "max")}


def pseudonym_of_path(path: Path) -> str:
    """The pseudonym the learner gives the drive at ``path`` (its name from meta.json)."""
    meta = json.loads((Path(path) / "meta.json").read_text())
    return pseudonym(str(meta.get("name", Path(path).name)))


def publish(candidate_dir: str | Path, repo: str | Path, keys: str | Path, log=print) -> list:
    """Sign and publish the candidate's new models, only with an accepted gate verdict for exactly these files."""
    from bms_ai.fleet.tufrepo import TufPublisher

    candidate_dir = Path(candidate_dir)
    path = candidate_dir / GATE_FILE
    if not path.is_file():
        raise ValueError(f"{candidate_dir}: no {GATE_FILE}; run the gate first")
    record = json.loads(path.read_text())
    if not record.get("accepted"):
        raise ValueError(f"{candidate_dir}: the gate refused this candidate: {'; '.join(record.get('reasons', []))}")
    names = _new_files(candidate_dir)
    if file_hashes(candidate_dir, names) != record.get("files"):
        raise ValueError(f"{candidate_dir}: files changed since the gate accepted them; gate again")
    pub = TufPublisher(repo, keys)
    out = []
    for n in names:
        if n.endswith(".onnx"):
            row = pub.publish(candidate_dir / n)
            log(f"[publish] {n}: {'already published' if row is None else 'published'}")
            out.append(row)
    return out


class GateCommand:
    """`bms-ai fleet gate CANDIDATE --drives ...`: exit 0 accepted, 1 refused (reasons printed)."""

    @staticmethod
    def add_arguments(p) -> None:
        """Candidate, held-out vehicles, the current models and the rule's margin."""
        p.add_argument("candidate", help="candidate directory written by `bms-ai fleet train`")
        p.add_argument("--drives", nargs="+", required=True, help="held-out vehicles (truth SOC needed)")
        p.add_argument("--models", default="", help="current model directory (default: the one the candidate grew from)")
        p.add_argument("--rate-hz", type=nonneg_float, default=1.0, help="resample the drives to this rate first (0: as recorded)")
        p.add_argument("--jobs", type=int, default=1, help="vehicles evaluated in parallel")
        p.add_argument("--margin", type=float, default=GateRule.unfamiliar_margin,
                       help="required RMSE reduction on unfamiliar cells (fraction)")

    @staticmethod
    def run(args) -> int:
        """Gate; a one-line error on bad input."""
        import sys

        try:
            rec = gate(args.candidate, args.drives, args.models or None, GateRule(unfamiliar_margin=args.margin),
                       args.rate_hz, args.jobs)
        except (ValueError, FileNotFoundError, KeyError) as exc:
            print(f"bms-ai fleet gate: {exc}", file=sys.stderr)
            return 2
        return 0 if rec["accepted"] else 1


class PublishCommand:
    """`bms-ai fleet publish CANDIDATE --repo R --keys K`: sign and publish an accepted candidate."""

    @staticmethod
    def add_arguments(p) -> None:
        """Candidate, TUF repository and key directory."""
        p.add_argument("candidate")
        p.add_argument("--repo", required=True, help="TUF repository (bms-ai fleet tuf init)")
        p.add_argument("--keys", required=True, help="key directory (files only; never arguments or environment)")

    @staticmethod
    def run(args) -> int:
        """Publish; a one-line error when the gate did not accept or the files changed."""
        import sys

        from bms_ai.fleet.tufrepo import TufRepoError

        try:
            publish(args.candidate, args.repo, args.keys)
        except (ValueError, FileNotFoundError, TufRepoError) as exc:
            print(f"bms-ai fleet publish: {exc}", file=sys.stderr)
            return 2
        return 0
