"""The shipped overpotential models: loadable by this pipeline, calibrated, and physically sensible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bms_ai.estimation.features import ETA_FEATURES, N_FEATURES
from bms_ai.estimation.overpotential import ErrorModel, LearnedEta
from bms_ai.estimation.soc import soc_model_expectation
from bms_ai.models.manifest import read_manifest
from bms_ai.models.runtime import verify_and_load

NAMES = [n for n, _ in ETA_FEATURES]



@pytest.fixture(scope="module")
def shipped(root: Path) -> dict:
    entries, errors = read_manifest(root / "models")
    assert not errors
    soc = [e for e in entries if e.task == "soc"]
    return {e.chemistry: verify_and_load(root / "models", e, soc_model_expectation()) for e in soc}


def test_one_current_model_per_chemistry(shipped) -> None:
    assert set(shipped) == {"nmc", "lfp"}
    for chem, res in shipped.items():
        assert res.model is not None, res.reason
        assert res.entry.name == f"soc_eta_{chem}" and res.entry.inputs[0].names == NAMES


def test_error_model_and_domain_are_complete(shipped) -> None:
    for res in shipped.values():
        e = res.entry
        em = ErrorModel.from_dict(e.extra["error_model"])
        assert set(e.extra["error_model"]) == set(ErrorModel.__dataclass_fields__)
        assert em.slow_floor > 0 and em.fast_floor > 0 and em.slow_scale >= 0 and em.fast_scale >= 0
        assert 0 < em.tau_fast < em.tau_model and 0 < em.k_cell <= 2 and 0 < em.k_cell_fast <= 2
        assert 0 < e.extra["sigma_max_v"] < 2
        lo, hi = np.array(e.domain["min"]), np.array(e.domain["max"])
        assert lo.shape == hi.shape == (N_FEATURES,) and (lo <= hi).all()
        assert e.metrics["val_eta_rmse_mv"]["all"] > 0 and e.provenance["seed"] == 0


def _features(i_c: float, temp: float = 25.0, soc: float = 0.5, rest_s: float = 0.0) -> np.ndarray:
    """Steady current i_c for a long time (every EMA at it), 96 cells."""
    f = np.zeros(N_FEATURES, np.float32)
    for n in ("i", "i_ema5", "i_ema30", "i_ema120", "i_ema600", "i_ema1800"):
        f[NAMES.index(n)] = i_c
    f[NAMES.index("abs_i_ema600")] = abs(i_c)
    f[NAMES.index("temp")] = temp
    f[NAMES.index("soc")] = soc
    f[NAMES.index("hysteresis")] = np.sign(i_c) if i_c else 0.0
    f[NAMES.index("ah_since_reversal")] = 0.3 if i_c else 0.0
    f[NAMES.index("log_rest_s")] = np.log1p(rest_s) / 10.0
    return np.tile(f, (96, 1))


def test_overpotential_has_the_sign_of_the_current_and_vanishes_at_rest(shipped) -> None:
    for chem, res in shipped.items():
        learned = LearnedEta(res.model)
        dis, _ = learned.step(1.0, 0.0, _features(-0.3))       # sustained 0.3 C: inside both models' domains
        chg, _ = learned.step(1.0, 0.0, _features(0.3))
        rest, _ = learned.step(1.0, 0.0, _features(0.0, rest_s=7200.0))
        assert dis.in_domain.all() and chg.in_domain.all() and rest.in_domain.all(), chem
        assert np.median(dis.eta) < -0.005 and np.median(chg.eta) > 0.003, chem
        assert np.abs(rest.eta).max() < 0.02, chem


@pytest.mark.xfail(strict=True, reason="the shipped models (few cold training drives) are not less certain at 0 degC")
def test_a_cold_cell_is_less_certain_than_a_warm_one(shipped) -> None:
    for chem, res in shipped.items():
        learned = LearnedEta(res.model)
        warm, _ = learned.step(1.0, 0.0, _features(-0.3))
        cold, _ = learned.step(1.0, 0.0, _features(-0.3, temp=0.0))
        assert np.median(cold.sig_slow + cold.sig_fast) > np.median(warm.sig_slow + warm.sig_fast), chem
