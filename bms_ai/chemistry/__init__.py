"""The chemistry registry: one record per cell chemistry (PyBaMM set, OCV table, limits, pack defaults).

    from bms_ai.chemistry import get_chemistry
    chem = get_chemistry("lfp")         # UnknownName (a ValueError) lists the known ones
    chem.limits_path, chem.v_max, chem.design_capacity_ah
"""

from bms_ai.chemistry.registry import CHEMISTRIES, Chemistry, find_chemistry, get_chemistry

__all__ = ["CHEMISTRIES", "Chemistry", "find_chemistry", "get_chemistry"]
