"""Classical estimators: OCV tables, Coulomb counting, batched EKF (no models, no rclpy)."""

from __future__ import annotations

import numpy as np
import pytest

from bms_ai.chemistry.ocv import load_ocv
from bms_ai.estimation.coulomb import CoulombCounter
from bms_ai.estimation.ekf import BatchedEKF, ECMParams


@pytest.mark.parametrize("chem,vmin,vmax", [("nmc", 2.5, 4.2), ("lfp", 2.0, 3.6)])
def test_ocv_tables_span_the_voltage_window(chem: str, vmin: float, vmax: float) -> None:
    c = load_ocv(chem)
    assert c(0.0) == pytest.approx(vmin, abs=0.02)
    assert c(1.0) == pytest.approx(vmax, abs=0.02)
    assert np.all(np.diff(c.ocv) > 0)
    s = np.linspace(0.05, 0.95, 19)
    assert np.allclose(c.inverse(c(s)), s, atol=2e-3)


def test_lfp_plateau_is_flat_and_nmc_is_not() -> None:
    lfp, nmc = load_ocv("lfp"), load_ocv("nmc")
    assert lfp(0.7) - lfp(0.3) < 0.1          # the hard case the NN is for
    assert nmc(0.7) - nmc(0.3) > 0.25


def test_unknown_chemistry_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no OCV table"):
        load_ocv("unobtainium")


def test_coulomb_counting_integrates_and_holds_on_nan() -> None:
    cc = CoulombCounter(50.0, 0.5, n=3)
    for _ in range(3600):
        cc.step(-25.0, 1.0)   # 0.5 C discharge for 1 h
    assert np.allclose(cc.soc, 0.0, atol=1e-9)
    cc = CoulombCounter(50.0, 0.5, n=1)
    cc.step(float("nan"), 1.0)
    assert cc.soc[0] == 0.5


def _ecm_drive(chem: str, n: int, seconds: float, seed: int = 0):
    """Truth from the ECM itself (plus sensor noise): a check of the filter algebra, not of the model."""
    rng = np.random.default_rng(seed)
    p = ECMParams(capacity_ah=5.0, r0=0.02, r1=0.01, tau=30.0)
    ocv = load_ocv(chem)
    dt = 0.1
    k = int(seconds / dt)
    seg = np.repeat(rng.uniform(-2.0, 1.0, k // 200 + 1) * p.capacity_ah, 200)[:k]
    soc = np.full(n, 0.8) + rng.uniform(-0.05, 0.05, n)
    v1 = np.zeros(n)
    a = np.exp(-dt / p.tau)
    socs, volts = [], []
    for i in seg:
        soc = soc + i * dt / 3600 / p.capacity_ah
        v1 = a * v1 + p.r1 * (1 - a) * i
        volts.append(ocv(soc) + v1 + p.r0 * i + 0.001 * rng.standard_normal(n))
        socs.append(soc.copy())
    return p, seg, np.array(volts), np.array(socs)


@pytest.mark.drive   # ~1 s: outside the fast library tier
def test_batched_ekf_recovers_from_wrong_initial_soc_on_96_cells() -> None:
    p, cur, volts, socs = _ecm_drive("nmc", 96, 900.0)
    ekf = BatchedEKF(96, "nmc", ECMParams(**{**p.__dict__, "r_v": 1e-5}), soc0=0.5)
    for k in range(len(cur)):
        ekf.step(cur[k], volts[k], 0.1)
    assert np.max(np.abs(ekf.soc - socs[-1])) < 0.02
    assert np.all(ekf.sigma < 0.05)


def test_ekf_holds_on_missing_voltage_and_current() -> None:
    ekf = BatchedEKF(4, "lfp", soc0=0.6)
    ekf.step(float("nan"), np.full(4, 3.3), 0.1)
    assert np.allclose(ekf.soc, 0.6)
    ekf.step(-2.3, np.full(4, np.nan), 1.0)       # no voltage: prediction only
    assert np.allclose(ekf.soc, 0.6 - 2.3 / 3600 / ekf.p.capacity_ah)
