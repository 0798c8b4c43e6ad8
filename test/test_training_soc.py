"""`bms-ai train soc`: which drives train and validate (fast); a whole reproducible run (slow, torch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bms_ai.estimation.features import ETA_FEATURES
from bms_ai.estimation.overpotential import EcmParams, ErrorModel, LearnedEta
from bms_ai.sim.dataset import load_drive, save_npz
from bms_ai.training.ecm import ecm_cell_drive
from bms_ai.training.rows import plan_data, variant_of

CELL = EcmParams(r0=0.0025, r1=0.002, tau=60.0, activation_k=3500.0, hysteresis_v=0.0)
VARIANTS = {"A": CELL, "B": EcmParams(r0=0.004, r1=0.001, tau=30.0, activation_k=2500.0)}


def _saved(tmp_path: Path, sub: str, seeds: list[int], chem: str = "nmc") -> Path:
    for s in seeds:
        v = "AB"[s % 2]
        d = ecm_cell_drive(VARIANTS[v], chem, s, float(10 * (s % 4)), duration=900.0, dt=1.0, n_cells=3)
        d.meta["cell_set"] = v
        save_npz(tmp_path / sub / d.name, d)
    return tmp_path / sub


def test_data_plan_keeps_validation_apart(tmp_path: Path) -> None:
    data = _saved(tmp_path, "train", [1, 2, 3])
    plan = plan_data("nmc", [str(data)], [], 0, 0.34)
    assert len(plan.train) == 2 and len(plan.val) == 1 and "seeded split" in plan.split
    assert variant_of(plan.val[0]) in ("A", "B")
    with pytest.raises(ValueError, match="both in --data and --val"):
        plan_data("nmc", [str(data)], [str(data)], 0, 0.2)
    with pytest.raises(ValueError, match="training and validation"):
        plan_data("lfp", [str(data)], [], 0, 0.2)


@pytest.mark.slow
def test_train_soc_end_to_end_is_reproducible(tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch", reason="torch is the optional 'train' extra (pip install torch==2.13.0)")
    from bms_ai.cli import main
    from bms_ai.estimation.soc import SocEstimator, soc_model_expectation
    from bms_ai.models.manifest import read_manifest
    from bms_ai.models.runtime import verify_and_load

    train = _saved(tmp_path, "train", [1, 2, 3, 4])
    val = _saved(tmp_path, "val", [5, 6])
    shas = []
    for k in range(2):
        out = tmp_path / f"m{k}"
        assert main(["train", "soc", "--chemistry", "nmc", "--data", str(train), "--val", str(val), "--out", str(out),
                     "--epochs", "2", "--seed", "3"]) == 0
        entries, errors = read_manifest(out)
        assert not errors and len(entries) == 1
        e = entries[0]
        shas.append(e.sha256)
        assert e.name == "soc_eta_nmc" and e.file == "soc_eta_nmc_v1.onnx" and e.params <= 6000
        assert set(e.extra["error_model"]) == set(ErrorModel.__dataclass_fields__) and e.extra["sigma_max_v"] > 0
        assert e.provenance["val_drives"] == ["ecm_nmc_5", "ecm_nmc_6"] and e.provenance["seed"] == 3
        assert e.metrics["val_eta_rmse_mv"]["all"] > 0 and "total" in e.metrics["val_coverage"]
        # the shipped error model is calibrated on cells the model never saw (one variant left out per fold)
        assert "out-of-fold" in e.extra["error_model_source"] and e.extra["sigma_network"]["hidden"] == 16
        assert set(e.metrics["unseen_eta_rmse_mv"]["by_variant"]) == {"A", "B"}
        assert e.inputs[0].names == [n for n, _ in ETA_FEATURES]
        res = verify_and_load(out, e, soc_model_expectation())
        assert res.model is not None, res.reason
        eta, sigma = res.model.run(np.zeros((96, len(ETA_FEATURES)), np.float32))
        assert eta.shape == (96, 1) and (sigma > 0).all()
    assert shas[0] == shas[1]     # same seed and data -> byte-identical model
    printed = capsys.readouterr().out
    assert '"ecm_fallback"' in printed
    # the estimator's overpotential wrapper takes it as it is (error model, domain, sigma cap)
    learned = LearnedEta(res.model)
    assert learned.error == ErrorModel.from_dict(e.extra["error_model"])
    mid = np.tile((np.array(e.domain["min"]) + np.minimum(e.domain["max"], 1.0)) / 2, (3, 1)).astype(np.float32)
    terms, _ = learned.step(1.0, 0.0, mid)
    assert terms.in_domain.all() and np.isfinite(terms.eta).all() and (terms.sig_slow > 0).all()
    d = load_drive(val / "ecm_nmc_5")
    est = SocEstimator(3, 3, "nmc", d.capacity_ah, model=res.model, soc0=d.soc[0])
    for k in range(50):
        assert np.isfinite(est.step(float(d.t[k]), float(d.current[k]), d.cell_v[k], d.cell_t[k]).soc)


@pytest.mark.slow
@pytest.mark.pybamm
def test_train_soc_on_pybamm_drives(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="torch is the optional 'train' extra (pip install torch==2.13.0)")
    pytest.importorskip("pybamm")
    from bms_ai.cli import main
    from bms_ai.models.manifest import read_manifest

    data = tmp_path / "drives"
    assert main(["train", "synth", "--chemistry", "lfp", "--seeds", "100-102", "--duration", "600", "--cells", "2",
                 "--out", str(data)]) == 0
    assert main(["train", "soc", "--chemistry", "lfp", "--data", str(data), "--out", str(tmp_path / "m"),
                 "--epochs", "1"]) == 0
    (e,), _ = read_manifest(tmp_path / "m")
    assert e.provenance["variants"] == ["Prada2013"] and json.dumps(e.metrics)
