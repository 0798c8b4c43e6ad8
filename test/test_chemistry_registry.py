"""The chemistry registry: every name resolves in one place, unknown names fail with one line."""

from __future__ import annotations

import pytest

from bms_ai.can.packconfig import PackConfigError, load_pack_config, parse_pack_config
from bms_ai.chemistry import CHEMISTRIES, get_chemistry
from bms_ai.chemistry.ocv import load_ocv
from bms_ai.core.registry import UnknownName
from bms_ai.diagnostics.config import default_limits_path, load_limits


def test_every_registered_chemistry_has_its_data() -> None:
    for name in CHEMISTRIES:
        chem = get_chemistry(name)
        assert chem.name == name and CHEMISTRIES.help(name) == chem.description
        assert chem.v_min < chem.nominal_v < chem.v_max
        ocv = load_ocv(name)
        assert ocv.v_min < chem.v_min and abs(ocv.v_max - chem.v_max) < 0.05   # table spans the window
        assert load_limits(chem.limits_path).chemistry == name
        assert default_limits_path(name) == chem.limits_path
        cfg = load_pack_config(chem.pack_config_path)
        assert cfg.chemistry == name
        assert cfg.design_capacity_ah == pytest.approx(chem.design_capacity_ah)


def test_lookup_is_case_insensitive() -> None:
    assert get_chemistry(" LFP ") is get_chemistry("lfp")


def test_unknown_chemistry_is_a_one_line_error_listing_the_known_ones() -> None:
    with pytest.raises(UnknownName) as exc:
        get_chemistry("nca")
    msg = str(exc.value)
    assert "\n" not in msg and "'nca'" in msg and all(n in msg for n in CHEMISTRIES)
    assert isinstance(exc.value, ValueError)


def test_pack_config_naming_a_chemistry_without_data_fails(tmp_path) -> None:
    doc = {"dbc": "x.dbc", "cells": 4, "chemistry": "nca", "pack_voltage": {"message": "M", "signal": "V"},
           "pack_current": {"message": "M", "signal": "I"}, "cell_voltages": []}
    with pytest.raises(PackConfigError) as exc:
        parse_pack_config(doc, tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and "'nca'" in msg and all(n in msg for n in CHEMISTRIES)
