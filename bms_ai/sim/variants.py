"""Named cell variants and the train / held-out split (data in ``data/variants.json``).

The split is by cell type, not by drive: a held-out variant never appears in
training or validation drives, early stopping or hyper-parameter search, so the
evaluation on it measures what an estimator does on a cell it has never seen.
Each variant is a ``CellSpec`` around a PyBaMM set; ``draw_variant_cell`` draws a
randomised (and optionally aged) cell around it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bms_ai.core.registry import Registry
from bms_ai.sim.cells import CellSpec, draw_cell

VARIANTS_FILE = Path(__file__).resolve().parent / "data" / "variants.json"
ROLES = ("train", "heldout")
_FACTORS = ("area_scale", "q_ne", "q_pe", "q_li", "j0_n", "j0_p", "d_n", "d_p")   # drawn spread multiplies these
_OFFSETS = ("warp_n", "warp_p", "dv_mv", "r_contact_frac")                          # ... and adds to these


@dataclass(frozen=True)
class Variant:
    """One named cell type: its role in the split, the estimator's chemistry family, its design capacity."""

    name: str
    role: str            # train | heldout
    chemistry: str       # nmc (NMC / NCA family) | lfp
    nominal_ah: float    # design capacity the estimator is told
    description: str
    spec_fields: dict    # CellSpec fields (base, target_ah, hyst_mv, factors, overrides)

    @property
    def held_out(self) -> bool:
        """True for cell types no training or tuning step may see."""
        return self.role == "heldout"

    @property
    def base(self) -> str:
        """The PyBaMM parameter set the variant is built on."""
        return str(self.spec_fields["base"])

    @property
    def hyst_mv(self) -> float:
        """Full OCV hysteresis gap [mV] (0: none)."""
        return float(self.spec_fields.get("hyst_mv", 0.0))


def _load(path: Path) -> Registry[Variant]:
    reg: Registry[Variant] = Registry("cell variant")
    for name, d in json.loads(path.read_text())["variants"].items():
        d = dict(d)
        role, chem = d.pop("role"), d.pop("chemistry")
        if role not in ROLES:
            raise ValueError(f"{path.name}: variant {name}: role {role!r} not in {ROLES}")
        v = Variant(name=name, role=role, chemistry=chem, nominal_ah=float(d.pop("nominal_ah")),
                    description=str(d.pop("description", "")), spec_fields=d)
        CellSpec(**v.spec_fields)   # unknown fields fail here, at load time
        reg.add(name, v, v.description)
    return reg


VARIANTS: Registry[Variant] = _load(VARIANTS_FILE)


def get_variant(name: str) -> Variant:
    """The variant ``name``; an unknown name raises UnknownName listing the known ones."""
    return VARIANTS.get(name)


def variant_names(chemistry: str | None = None, role: str | None = None) -> list[str]:
    """Variant names (file order), optionally of one chemistry family and / or role."""
    out = []
    for n in VARIANTS.names():
        v = VARIANTS.get(n)
        if (chemistry is None or v.chemistry == chemistry) and (role is None or v.role == role):
            out.append(n)
    return out


def spec(name: str, **extra) -> CellSpec:
    """The unrandomised variant cell (``extra`` overrides CellSpec fields)."""
    d = dict(get_variant(name).spec_fields)
    d.update(extra)
    return CellSpec(**d)


def draw_variant_cell(name: str, seed: int, soh: float | tuple[float, float] | None = None,
                      spread: float = 1.0) -> CellSpec:
    """A randomised cell around a named variant.

    The manufacturing draws multiply the variant's factors (q_*, j0_*, d_*, area) and add to
    its warps / offsets; its overrides, capacity normalisation and hysteresis are kept.
    """
    v = get_variant(name).spec_fields
    cs = draw_cell(v["base"], seed, soh=soh, spread=spread, target_ah=v.get("target_ah"),
                   hyst_mv=v.get("hyst_mv", 0.0), overrides=v.get("overrides"))
    for k in _FACTORS:
        setattr(cs, k, getattr(cs, k) * v.get(k, 1.0))
    for k in _OFFSETS:
        setattr(cs, k, getattr(cs, k) + v.get(k, 0.0))
    return cs
