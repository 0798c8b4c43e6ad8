"""Fleet simulator: the record, physics sanity (charge, parks, limits), faults, determinism, config, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bms_ai.cli import main
from bms_ai.fleet.cellmodel import load_cell_type
from bms_ai.fleet.simulator import VIN_CHARS, FleetConfig, bms_limits, parse_mix, simulate_fleet, simulate_vehicle
from bms_ai.sim.dataset import load_drive

MIX = {"NMC_Chen2020": 1.0}


def _cfg(**kw) -> FleetConfig:
    d = {"vehicles": 2, "days": 1.5, "seed": 5, "n_cells": 6, "mix": MIX, "fault_rate": 0.0}
    d.update(kw)
    return FleetConfig(**d)


@pytest.fixture(scope="module")
def clean():
    """One vehicle without faults or fade: the physics checks run on it."""
    return simulate_vehicle(_cfg(fade_per_day=0.0).validate(), 0)


def test_record_has_the_common_fields(clean):
    d = clean
    n, t = d.n_cells, len(d.t)
    assert d.cell_v.shape == (t, n) and d.soc.shape == (t, n) and d.cell_t.shape == (t, 2)
    assert d.session.dtype == np.int32 and d.current_true.shape == (t,) and d.cell_capacity_ah.shape == (n,)
    same = d.session[1:] == d.session[:-1]
    np.testing.assert_allclose(np.diff(d.t)[same], 1.0)                 # 1 Hz while awake
    assert np.all(np.diff(d.t)[~same] >= 3600.0 - 1e-6)                  # parks of at least an hour
    m = d.meta
    for key in ("vehicle_id", "t0_unix", "variant", "held_out", "soh", "faults", "climate", "driver", "rate_hz"):
        assert key in m
    assert m["rate_hz"] == 1.0 and len(m["soh"]) == n and m["faults"] == []
    vid = m["vehicle_id"]
    assert len(vid) == 17 and set(vid) <= set(VIN_CHARS)


def test_charge_is_conserved_per_cell(clean):
    """Coulomb counting of the true current (minus each cell's leak) gives the truth SOC within 0.1 %."""
    d = clean
    dt = np.diff(d.t, prepend=d.t[0])
    leak = np.asarray(d.meta["cells"]["leak_a"])
    q = np.cumsum(d.current_true * dt)[:, None] - leak[None, :] * (d.t - d.t[0])[:, None]
    soc_cc = d.soc[0] + q / (3600.0 * d.cell_capacity_ah)
    assert np.max(np.abs(soc_cc - d.soc)) < 1e-3


def test_parks_lose_charge_by_the_leak_only(clean):
    d = clean
    k = np.flatnonzero(np.diff(d.session)) + 1
    assert len(k) >= 2
    gap = d.t[k] - d.t[k - 1]
    leak = np.asarray(d.meta["cells"]["leak_a"])
    expect = -leak[None, :] * gap[:, None] / (3600.0 * d.cell_capacity_ah[None, :])
    np.testing.assert_allclose(d.soc[k] - d.soc[k - 1], expect, rtol=1e-6, atol=1e-12)
    assert np.all(d.current_true[k] == 0.0)


def test_voltage_and_soc_stay_inside_the_chemistry_limits(clean):
    ct = load_cell_type("NMC_Chen2020")
    lo, hi = bms_limits(ct)
    assert d_ok(clean.cell_v, lo - 0.03, hi + 0.02)
    assert clean.soc.min() > 0.0 and clean.soc.max() < 1.0


def d_ok(v, lo, hi) -> bool:
    return bool(v.min() >= lo and v.max() <= hi)


def test_same_seed_same_fleet_other_seed_other_fleet():
    a = [d for d in simulate_fleet(_cfg(days=0.6))]
    b = [d for d in simulate_fleet(_cfg(days=0.6))]
    c = next(iter(simulate_fleet(_cfg(days=0.6, seed=6))))
    for x, y in zip(a, b):
        assert x.meta["vehicle_id"] == y.meta["vehicle_id"]
        for k in ("t", "current", "cell_v", "cell_t", "soc", "current_true"):
            np.testing.assert_array_equal(getattr(x, k), getattr(y, k))
    assert a[0].meta["vehicle_id"] != a[1].meta["vehicle_id"] != c.meta["vehicle_id"]
    assert len(c.t) != len(a[0].t) or not np.array_equal(c.cell_v, a[0].cell_v)


def test_vehicle_k_does_not_depend_on_the_fleet_size():
    one = simulate_vehicle(_cfg(days=0.6, vehicles=1).validate(), 1)
    two = list(simulate_fleet(_cfg(days=0.6, vehicles=2)))[1]
    np.testing.assert_array_equal(one.cell_v, two.cell_v)


def test_a_later_period_is_the_same_vehicle_a_week_older():
    cfg = _cfg(days=1.0, fault_rate=1.0, fade_per_day=1e-3).validate()
    p0 = simulate_vehicle(cfg, 0)
    p1 = simulate_vehicle(FleetConfig(**{**cfg.__dict__, "period": 1}).validate(), 0)
    for k in ("vehicle_id", "variant", "driver"):
        assert p1.meta[k] == p0.meta[k]
    assert p1.meta["climate"]["name"] == p0.meta["climate"]["name"]      # other days, same climate
    assert p1.meta["t0_unix"] == p0.meta["t0_unix"] + 86400.0
    # the same faults, their onsets one period earlier (negative: already there when the period starts)
    assert [(f["kind"], f["cell"]) for f in p1.meta["faults"]] == [(f["kind"], f["cell"]) for f in p0.meta["faults"]]
    for f0, f1 in zip(p0.meta["faults"], p1.meta["faults"]):
        assert f1["onset_s"] == pytest.approx(f0["onset_s"] - 86400.0, abs=0.1)
    # aged: capacity at the start of period 1 = the start of period 0 less a day of fade (and the fault's own)
    np.testing.assert_array_less(p1.cell_capacity_ah, p0.cell_capacity_ah)
    first_h = p1.t[0] / 3600.0                      # period 1's first wake-up, hours after its midnight
    assert np.median(p1.cell_capacity_ah / p0.cell_capacity_ah) == pytest.approx(1.0 - 1e-3 * (1 + first_h / 24), abs=5e-5)
    assert p1.meta["classes"][0] == "b" and not np.array_equal(p1.current, p0.current[: len(p1.current)])


@pytest.fixture(scope="module")
def faulty():
    return simulate_vehicle(_cfg(days=3.0, fault_rate=1.0, fade_per_day=0.0).validate(), 0)


def test_injected_faults_show_in_the_truth(faulty):
    d = faulty
    faults = {f["kind"]: f for f in d.meta["faults"]}
    assert set(faults) == {"internal_short", "capacity_fade", "contact_resistance"}
    caps_end = np.asarray(d.meta["cells"]["capacity_end_ah"])
    fade = faults["capacity_fade"]
    rel = caps_end / d.cell_capacity_ah
    assert rel[fade["cell"]] < 1.0 - 0.5 * fade["fade_per_day"] and np.delete(rel, fade["cell"]).min() == 1.0
    # the shorted cell drains against its peers after the onset (same current, more leak)
    short = faults["internal_short"]
    after = d.t >= short["onset_s"]
    if after.sum() > 10 and d.t[-1] - short["onset_s"] > 6 * 3600:
        k0, k1 = np.flatnonzero(after)[[0, -1]]
        dq = (d.soc[k1] - d.soc[k0]) * d.cell_capacity_ah        # Ah each cell gained after the onset
        c = short["cell"]
        if c != fade["cell"]:
            others = np.delete(dq, [c, fade["cell"]])
            assert dq[c] < others.min() - 0.5 * short["leak_a"] * (d.t[k1] - d.t[k0]) / 3600.0
    # the contact-resistance cell: a larger voltage drop under load than its peers after the onset
    cr = faults["contact_resistance"]
    load = (d.t >= cr["onset_s"]) & (np.abs(d.current_true) > 20.0)
    if load.sum() > 50:
        dev = (d.cell_v[load] - np.median(d.cell_v[load], axis=1, keepdims=True)) / d.current_true[load, None]
        assert np.median(dev[:, cr["cell"]]) > 0.5 * cr["r_extra_ohm"]


@pytest.mark.parametrize("kw", [{"vehicles": 0}, {"days": -1}, {"n_cells": 0}, {"soh": (0.9, 0.8)},
                                {"mix": {"NMC_Nope": 1.0}}, {"mix": {"NMC_Chen2020": -1.0}}, {"climates": {"arctic": 1}},
                                {"fault_rate": 2.0}, {"n_temps": 99}, {"period": -1}])
def test_bad_config_is_a_one_line_value_error(kw):
    with pytest.raises(ValueError) as e:
        _cfg(**kw).validate()
    assert "\n" not in str(e.value)


def test_parse_mix():
    assert parse_mix("NMC_Chen2020=2, LFP_A123") == {"NMC_Chen2020": 2.0, "LFP_A123": 1.0}
    with pytest.raises(ValueError, match="VARIANT=WEIGHT"):
        parse_mix("NMC_Chen2020=x")


def test_cli_writes_vehicles_and_a_summary(tmp_path, capsys):
    out = tmp_path / "fleet"
    rc = main(["fleet", "simulate", "--vehicles", "2", "--days", "0.5", "--cells", "4", "--seed", "3",
               "--mix", "NMC_Chen2020=1", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "fleet.json").read_text())
    assert len(summary["vehicles"]) == 2 and summary["calendar_h"] == pytest.approx(24.0)
    d = load_drive(out / summary["vehicles"][0]["vehicle_id"])
    assert d.meta["vehicle_id"] == summary["vehicles"][0]["vehicle_id"] and d.session is not None


def test_cli_bad_arguments_are_one_line(tmp_path, capsys):
    rc = main(["fleet", "simulate", "--vehicles", "1", "--days", "0.5", "--mix", "NMC_Chen2020=oops",
               "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "\n" not in err
