"""Pack config: maps DBC signals to pack quantities, validated against the DBC.

Another vehicle's pack needs only a DBC and one of these YAML files. Every
error names the YAML path of the bad entry and what would fix it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cantools.database import Database

from bms_ai.can.checks import CRC_ALGORITHMS
from bms_ai.chemistry.registry import CHEMISTRIES
from bms_ai.core.yamlfile import load_yaml


class PackConfigError(ValueError):
    """A pack config is invalid; the message names the entry and the fix."""

    def __init__(self, message: str) -> None:
        # one line whatever the file holds: a key with a line break is shown escaped
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


@dataclass(frozen=True)
class ScalarMap:
    """One pack quantity from one DBC signal, ``value = dbc_value * scale + offset``."""

    message: str
    signal: str
    scale: float = 1.0
    offset: float = 0.0
    valid: str | None = None  # signal that is 1 when the value is valid


@dataclass(frozen=True)
class ArrayGroup:
    """Array elements (cells, sensors) carried by one message.

    ``slots``: signals of one frame; element index = mux * per_mux + slot + offset
    (per_mux defaults to len(slots); without a multiplexer mux = 0).
    ``signals``: explicit signal name -> element index, for DBCs that name
    each cell's signal.
    """

    message: str
    slots: tuple[str, ...] = ()
    invalid: tuple[str | None, ...] = ()
    per_mux: int = 0
    offset: int = 0
    signals: dict[str, int] = field(default_factory=dict)
    scale: float = 1.0
    value_offset: float = 0.0


@dataclass(frozen=True)
class MessageCheck:
    """Protection for one message: receive timeout, alive counter, checksum."""

    message: str
    timeout: float | None = None
    counter: str | None = None
    crc_signal: str | None = None
    crc_algorithm: str = "crc8_sae_j1850"


@dataclass(frozen=True)
class PackConfig:
    """One pack: its DBC, cell and sensor counts, and where every pack quantity sits in the DBC."""

    pack_id: str
    dbc_path: Path
    dbc_strict: bool
    chemistry: str
    n_cells: int
    n_temps: int
    design_capacity_ah: float
    pack_voltage: ScalarMap
    pack_current: ScalarMap
    cell_voltages: tuple[ArrayGroup, ...]
    cell_temperatures: tuple[ArrayGroup, ...]
    status: dict[str, ScalarMap]
    checks: tuple[MessageCheck, ...]
    source: Path | None = None
    poll: PollConfig | None = None  # diagnostic requests for values the pack does not broadcast
    limits: dict[str, Any] = field(default_factory=dict)  # overrides of the chemistry's limits file, per pack
    vehicle_bms: dict[str, str] = field(default_factory=dict)  # the car's own BMS values: name -> sample status key
    ocv_file: Path | None = None       # the cell's own OCV curve (csv: soc, volts); None: chemistry prior
    ocv_sigma_v: float = 0.003         # how far that curve is trusted

    @property
    def pack_level(self) -> bool:
        """No per-cell voltage from broadcast or poll: the bridge publishes the average cell (V / cells)."""
        return not self.cell_voltages and not polled_indices(self.poll, "cell_voltages")

    @property
    def cell_channels(self) -> int:
        """Cell voltages the pack reports one by one: ``n_cells`` (cells in series), 0 when pack-level."""
        return 0 if self.pack_level else self.n_cells


#: diagnostic services a poll may use -> width in bytes of their identifier (echoed in the answer)
POLL_SERVICES = {
    0x01: 1,  # OBD-II mode 01, current data by PID
    0x09: 1,  # OBD-II mode 09, vehicle information
    0x21: 1,  # ReadDataByLocalIdentifier (KWP2000; Hyundai/Kia and Nissan group reads)
    0x22: 2,  # UDS ReadDataByIdentifier
}
#: value names that fill the pack's own arrays (``index`` = first element); any other name is a value of its own
POLL_ARRAYS = {"cell_voltages": "cells", "cell_temperatures": "temperature_sensors"}
MAX_POLL_REQUESTS = 256
MAX_ISOTP_PAYLOAD = 4095  # classic ISO-TP: the 12-bit length of a first frame


@dataclass(frozen=True)
class PollValue:
    """Bytes of a diagnostic answer as one value or a run of elements: ``raw * scale + offset``.

    ``start`` counts from the first byte after the service echo and the
    identifier (OVMS's and the OBD-PID projects' convention), so a layout
    copied from them needs no shift.
    """

    name: str
    start: int
    count: int = 1
    size: int = 1  # bytes per element (the YAML key is ``bytes``)
    scale: float = 1.0
    offset: float = 0.0
    signed: bool = False
    byteorder: str = "big"
    index: int | None = None  # first element of a pack array (cell_voltages, cell_temperatures)
    valid: tuple[float, float] | None = None  # values outside [lo, hi] are NaN (a sensor's "no reading" code)

    @property
    def end(self) -> int:
        """One past the last data byte the value reads."""
        return self.start + self.count * self.size


@dataclass(frozen=True)
class PollRequest:
    """One diagnostic request, sent every ``period`` s, and how its answer maps to values."""

    name: str
    request_id: int
    response_id: int
    extended: bool
    service: int
    did: int
    period: float
    timeout: float
    values: tuple[PollValue, ...]
    padding: int | None = None  # pad request frames to 8 bytes with this byte (None: shortest frame)
    bus: str | None = None  # which bus when the bridge has several (None: the only one)

    @property
    def payload(self) -> bytes:
        """The request as sent: service byte then the identifier, big-endian."""
        return bytes([self.service]) + self.did.to_bytes(POLL_SERVICES[self.service], "big")

    @property
    def header(self) -> bytes:
        """The start of a positive answer: service + 0x40, then the identifier echoed."""
        return bytes([self.service + 0x40]) + self.did.to_bytes(POLL_SERVICES[self.service], "big")


@dataclass(frozen=True)
class PollConfig:
    """The ``poll:`` section: requests, and how hard the poller may press the ECUs."""

    requests: tuple[PollRequest, ...]
    min_gap: float = 0.05  # s between the end of one exchange with an ECU and the next request to it


_TOP_KEYS = {
    "pack_id", "dbc", "dbc_strict", "chemistry", "cells", "temperature_sensors",
    "design_capacity_ah", "pack_voltage", "pack_current", "cell_voltages",
    "cell_temperatures", "status", "checks", "poll", "limits", "vehicle_bms", "ocv",
}
_SCALAR_KEYS = {"message", "signal", "scale", "offset", "valid"}
_GROUP_KEYS = {"message", "slots", "invalid", "per_mux", "offset", "signals", "scale", "value_offset"}
_CHECK_KEYS = {"timeout", "counter", "crc"}
_POLL_KEYS = {"requests", "min_gap", "timeout"}
_REQUEST_KEYS = {"name", "request_id", "response_id", "extended", "service", "did", "period", "timeout",
                 "padding", "bus", "values"}
_VALUE_KEYS = {"start", "count", "bytes", "scale", "offset", "signed", "byteorder", "index", "valid"}
MAX_ELEMENTS = 4096  # cells or sensors of one pack; far above any vehicle, low enough to bound memory


def _shown(v: Any) -> str:
    """A value as an error message shows it: its type and a short repr (never a megabyte of text)."""
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _req(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise PackConfigError(f"{where}: missing required key '{key}'")
    return d[key]


def _mapping(d: Any, where: str) -> dict:
    if not isinstance(d, dict):
        raise PackConfigError(f"{where}: expected a mapping, got {_shown(d)}")
    return d


def _unknown(d: dict, allowed: set[str], where: str) -> None:
    extra = sorted(map(str, set(d) - allowed))
    if extra:
        raise PackConfigError(f"{where}: unknown key(s) {extra}; allowed: {sorted(allowed)}")


def _num(v: Any, where: str, kind: type = float) -> Any:
    """A finite number (``kind`` int: a whole one); YAML booleans are not numbers."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PackConfigError(f"{where}: expected {'an integer' if kind is int else 'a number'}, got {_shown(v)}")
    if not math.isfinite(v):
        raise PackConfigError(f"{where}: expected a finite number, got {v!r}")
    if kind is int:
        if int(v) != v:
            raise PackConfigError(f"{where}: expected an integer, got {v!r}")
        return int(v)
    return float(v)


def _count(v: Any, where: str, low: int) -> int:
    """A count of elements: an integer in ``low..MAX_ELEMENTS``."""
    n = _num(v, where, int)
    if not low <= n <= MAX_ELEMENTS:
        raise PackConfigError(f"{where}: expected an integer in {low}..{MAX_ELEMENTS}, got {n}")
    return n


def _text(v: Any, where: str) -> str:
    """A non-empty string (message and signal names, ids); numbers are not silently turned into names."""
    if not isinstance(v, str) or not v.strip():
        raise PackConfigError(f"{where}: expected a non-empty string, got {_shown(v)}")
    return v


def _opt_text(v: Any, where: str) -> str | None:
    return None if v is None else _text(v, where)


def _bool(v: Any, where: str) -> bool:
    """A YAML boolean (true/false); the string "false" is refused, it would read as true."""
    if not isinstance(v, bool):
        hint = " (write true or false without quotes)" if isinstance(v, str) else ""
        raise PackConfigError(f"{where}: expected a boolean true/false, got {_shown(v)}{hint}")
    return v


def _texts(v: Any, where: str, optional: bool = False) -> tuple[Any, ...]:
    """A list of signal names (``optional``: entries may be null, "no flag for this slot")."""
    if not isinstance(v, list):
        raise PackConfigError(f"{where}: expected a list of signal names, got {_shown(v)}")
    if len(v) > MAX_ELEMENTS:
        raise PackConfigError(f"{where}: more than {MAX_ELEMENTS} entries")
    return tuple(_opt_text(x, f"{where}[{i}]") if optional else _text(x, f"{where}[{i}]") for i, x in enumerate(v))


def _scalar(d: Any, where: str) -> ScalarMap:
    d = _mapping(d, where)
    _unknown(d, _SCALAR_KEYS, where)
    return ScalarMap(
        message=_text(_req(d, "message", where), f"{where}.message"),
        signal=_text(_req(d, "signal", where), f"{where}.signal"),
        scale=_num(d.get("scale", 1.0), f"{where}.scale"),
        offset=_num(d.get("offset", 0.0), f"{where}.offset"),
        valid=_opt_text(d.get("valid"), f"{where}.valid"),
    )


def _group(g: Any, w: str) -> ArrayGroup:
    g = _mapping(g, w)
    _unknown(g, _GROUP_KEYS, w)
    slots = _texts(g.get("slots") or [], f"{w}.slots")
    sigs = _mapping(g.get("signals") or {}, f"{w}.signals")
    if bool(slots) == bool(sigs):
        raise PackConfigError(f"{w}: give exactly one of 'slots' (index from mux and slot) or 'signals' (name -> index)")
    invalid = _texts(g.get("invalid") or [], f"{w}.invalid", optional=True)
    if invalid and len(invalid) != len(slots):
        raise PackConfigError(f"{w}.invalid: needs one entry per slot ({len(slots)}), got {len(invalid)}")
    per_mux = _count(g.get("per_mux", len(slots)), f"{w}.per_mux", 0)
    return ArrayGroup(
        message=_text(_req(g, "message", w), f"{w}.message"),
        slots=slots,
        invalid=invalid,
        per_mux=per_mux,
        offset=_count(g.get("offset", 0), f"{w}.offset", 0),
        signals={_text(k, f"{w}.signals key"): _count(x, f"{w}.signals.{k}", 0) for k, x in sigs.items()},
        scale=_num(g.get("scale", 1.0), f"{w}.scale"),
        value_offset=_num(g.get("value_offset", 0.0), f"{w}.value_offset"),
    )


def _groups(v: Any, where: str) -> tuple[ArrayGroup, ...]:
    if not isinstance(v, list):
        return (_group(v, where),)
    if not v:
        raise PackConfigError(f"{where}: expected a group or a non-empty list of groups, got an empty list")
    return tuple(_group(g, f"{where}[{i}]") for i, g in enumerate(v))


def _check(name: Any, c: Any, where: str) -> MessageCheck:
    w = f"{where}.checks.{name}"
    message = _text(name, f"{where}.checks key")
    c = _mapping({} if c is None else c, w)
    _unknown(c, _CHECK_KEYS, w)
    crc = c.get("crc")
    crc_sig, algo = None, "crc8_sae_j1850"
    if crc is not None:
        crc = _mapping(crc, f"{w}.crc")
        _unknown(crc, {"signal", "algorithm"}, f"{w}.crc")
        crc_sig = _text(_req(crc, "signal", f"{w}.crc"), f"{w}.crc.signal")
        algo = _text(crc.get("algorithm", algo), f"{w}.crc.algorithm")
        if algo not in CRC_ALGORITHMS:
            raise PackConfigError(f"{w}.crc.algorithm: '{algo}' unknown; known: {sorted(CRC_ALGORITHMS)}")
    t = c.get("timeout")
    timeout = None if t is None else _num(t, f"{w}.timeout")
    if timeout is not None and timeout <= 0:
        raise PackConfigError(f"{w}.timeout: expected seconds > 0, got {timeout}")
    return MessageCheck(message=message, timeout=timeout, counter=_opt_text(c.get("counter"), f"{w}.counter"),
                        crc_signal=crc_sig, crc_algorithm=algo)


def _chemistry(d: dict, where: str) -> str:
    chem = _text(d.get("chemistry", "nmc"), f"{where}.chemistry").lower()
    if chem not in CHEMISTRIES:
        raise PackConfigError(f"{where}.chemistry: '{chem}' is not one of {list(CHEMISTRIES)}")
    return chem


def _capacity(d: dict, where: str) -> float:
    if "design_capacity_ah" not in d:
        return float("nan")
    cap = _num(d["design_capacity_ah"], f"{where}.design_capacity_ah")
    if cap <= 0:
        raise PackConfigError(f"{where}.design_capacity_ah: expected Ah > 0, got {cap}")
    return cap


def _seconds(v: Any, where: str, low: float = 0.0, strict: bool = True) -> float:
    """A time in seconds above ``low`` (or at least ``low`` when not ``strict``)."""
    t = _num(v, where)
    if t < low or (strict and t == low):
        raise PackConfigError(f"{where}: expected seconds {'>' if strict else '>='} {low:g}, got {t:g}")
    return t


def _int_in(v: Any, where: str, low: int, high: int, what: str = "an integer") -> int:
    """A whole number in ``low..high`` (hex in YAML, 0x7E4, reads as one)."""
    n = _num(v, where, int)
    if not low <= n <= high:
        f = hex if high > 255 else str
        raise PackConfigError(f"{where}: expected {what} in {f(low)}..{f(high)}, got {f(n)}")
    return n


def _poll_value(name: Any, v: Any, w: str, counts: dict[str, int]) -> PollValue:
    name = _text(name, f"{w} key")
    w = f"{w}.{name}"
    v = _mapping(v, w)
    _unknown(v, _VALUE_KEYS, w)
    size = _int_in(v.get("bytes", 1), f"{w}.bytes", 1, 8)
    pv = PollValue(
        name=name,
        start=_int_in(_req(v, "start", w), f"{w}.start", 0, MAX_ISOTP_PAYLOAD),
        count=_count(v.get("count", 1), f"{w}.count", 1),
        size=size,
        scale=_num(v.get("scale", 1.0), f"{w}.scale"),
        offset=_num(v.get("offset", 0.0), f"{w}.offset"),
        signed=_bool(v.get("signed", False), f"{w}.signed"),
        byteorder=_text(v.get("byteorder", "big"), f"{w}.byteorder"),
        index=None if v.get("index") is None else _count(v["index"], f"{w}.index", 0),
        valid=_valid_range(v.get("valid"), f"{w}.valid"),
    )
    if pv.byteorder not in ("big", "little"):
        raise PackConfigError(f"{w}.byteorder: expected 'big' or 'little', got {pv.byteorder!r}")
    if pv.end > MAX_ISOTP_PAYLOAD:
        raise PackConfigError(f"{w}: bytes {pv.start}..{pv.end - 1} lie beyond the longest ISO-TP answer")
    if name in POLL_ARRAYS:
        first = pv.index or 0
        n = counts[name]
        if first + pv.count > n:
            raise PackConfigError(f"{w}: elements {first}..{first + pv.count - 1} outside 0..{n - 1} "
                                  f"(check index/count against '{POLL_ARRAYS[name]}')")
    elif pv.index is not None:
        raise PackConfigError(f"{w}.index: only {sorted(POLL_ARRAYS)} fill pack elements; drop 'index' here")
    return pv


def _valid_range(v: Any, where: str) -> tuple[float, float] | None:
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != 2:
        raise PackConfigError(f"{where}: expected [low, high], got {_shown(v)}")
    lo, hi = _num(v[0], f"{where}[0]"), _num(v[1], f"{where}[1]")
    if lo > hi:
        raise PackConfigError(f"{where}: low {lo:g} is above high {hi:g}")
    return lo, hi


def _ids(r: dict, w: str) -> tuple[int, int, bool]:
    """Request and response arbitration ids; 29-bit when asked for or when either needs it."""
    req = _int_in(_req(r, "request_id", w), f"{w}.request_id", 0, 0x1FFFFFFF, "an arbitration id")
    rsp = _int_in(_req(r, "response_id", w), f"{w}.response_id", 0, 0x1FFFFFFF, "an arbitration id")
    ext = _bool(r.get("extended", max(req, rsp) > 0x7FF), f"{w}.extended")
    if not ext and max(req, rsp) > 0x7FF:
        raise PackConfigError(f"{w}: ids above 0x7ff need 29 bits; set extended: true")
    if req == rsp:
        raise PackConfigError(f"{w}: request_id and response_id are both {req:#x}; the ECU answers on another id")
    return req, rsp, ext


def _poll_request(r: Any, w: str, timeout: float, counts: dict[str, int]) -> PollRequest:
    r = _mapping(r, w)
    _unknown(r, _REQUEST_KEYS, w)
    req, rsp, ext = _ids(r, w)
    service = _num(_req(r, "service", w), f"{w}.service", int)
    if service not in POLL_SERVICES:
        raise PackConfigError(f"{w}.service: {service:#x} is not one of "
                              f"{[hex(s) for s in POLL_SERVICES]} (0x22 UDS, 0x21 local identifier, 0x01/0x09 OBD)")
    width = POLL_SERVICES[service]
    did = _int_in(_req(r, "did", w), f"{w}.did", 0, (1 << (8 * width)) - 1, f"a {width}-byte identifier")
    values = _mapping(_req(r, "values", w), f"{w}.values")
    if not values:
        raise PackConfigError(f"{w}.values: expected at least one value")
    padding = r.get("padding")
    return PollRequest(
        name=_text(r.get("name", f"{req:x}_{service:02x}_{did:0{2 * width}x}"), f"{w}.name"),
        request_id=req, response_id=rsp, extended=ext, service=service, did=did,
        period=_seconds(_req(r, "period", w), f"{w}.period", 0.01, strict=False),
        timeout=_seconds(r.get("timeout", timeout), f"{w}.timeout"),
        values=tuple(_poll_value(k, v, f"{w}.values", counts) for k, v in values.items()),
        padding=None if padding is None else _int_in(padding, f"{w}.padding", 0, 255, "a byte"),
        bus=None if r.get("bus") is None else _text(str(r["bus"]), f"{w}.bus"),
    )


def _poll(p: Any, where: str, counts: dict[str, int]) -> PollConfig:
    """The ``poll:`` section; ``counts``: cells and sensors that pack-array values may fill."""
    w = f"{where}.poll"
    p = _mapping(p, w)
    _unknown(p, _POLL_KEYS, w)
    timeout = _seconds(p.get("timeout", 1.0), f"{w}.timeout")
    reqs = _req(p, "requests", w)
    if not isinstance(reqs, list) or not reqs:
        raise PackConfigError(f"{w}.requests: expected a non-empty list of requests, got {_shown(reqs)}")
    if len(reqs) > MAX_POLL_REQUESTS:
        raise PackConfigError(f"{w}.requests: more than {MAX_POLL_REQUESTS} requests")
    out = tuple(_poll_request(r, f"{w}.requests[{i}]", timeout, counts) for i, r in enumerate(reqs))
    seen: dict[object, str] = {}
    for i, r in enumerate(out):
        for key, what in ((r.name, f"name '{r.name}'"), ((r.request_id, r.service, r.did), "request")):
            if key in seen:
                raise PackConfigError(f"{w}.requests[{i}]: same {what} as {seen[key]}")
            seen[key] = f"requests[{i}]"
    return PollConfig(requests=out, min_gap=_seconds(p.get("min_gap", 0.05), f"{w}.min_gap", strict=False))


def parse_poll_config(data: Any, n_cells: int = 0, n_temps: int = 0, where: str = "pack config") -> PollConfig:
    """A ``poll:`` section on its own (a tool or test that polls without a DBC); errors as for a whole config."""
    return _poll(data, where, {"cell_voltages": n_cells, "cell_temperatures": n_temps})


def polled_indices(poll: PollConfig | None, name: str) -> set[int]:
    """Pack elements of array ``name`` (cell_voltages, cell_temperatures) that some poll fills."""
    out: set[int] = set()
    for r in poll.requests if poll else ():
        for v in r.values:
            if v.name == name:
                out.update(range(v.index or 0, (v.index or 0) + v.count))
    return out


#: prefix of the status entries a ``vehicle_bms`` DBC mapping adds (decode output columns, sample status keys)
VEHICLE_PREFIX = "vehicle_bms."


def _vehicle_bms(v: Any, where: str, poll: PollConfig | None) -> tuple[dict[str, str], dict[str, ScalarMap]]:
    """The ``vehicle_bms:`` section: name -> sample status key, and the DBC signals it adds to ``status``.

    Each entry is a DBC signal like a ``status`` entry, or ``{poll: NAME}``
    naming a value of a poll request (not a pack array).
    """
    w = f"{where}.vehicle_bms"
    v = _mapping(v or {}, w)
    polled = {pv.name for r in (poll.requests if poll else ()) for pv in r.values if pv.name not in POLL_ARRAYS}
    keys: dict[str, str] = {}
    status: dict[str, ScalarMap] = {}
    for name, entry in v.items():
        name = _text(name, f"{w} key")
        entry = _mapping(entry, f"{w}.{name}")
        if "poll" in entry:
            _unknown(entry, {"poll"}, f"{w}.{name}")
            ref = _text(entry["poll"], f"{w}.{name}.poll")
            if ref not in polled:
                raise PackConfigError(f"{w}.{name}.poll: '{ref}' is not a value of any poll request; "
                                      f"they are {sorted(polled)}")
            keys[name] = ref
        else:
            keys[name] = VEHICLE_PREFIX + name
            status[keys[name]] = _scalar(entry, f"{w}.{name}")
    return keys, status


def parse_pack_config(data: Any, base_dir: Path, source: Path | None = None) -> PackConfig:
    """Validate a parsed YAML document (without touching the DBC).

    Every value is checked for its type before use, so a wrong type is a
    one-line PackConfigError naming the key, never a TypeError from deep inside.
    """
    where = str(source) if source else "pack config"
    d = _mapping(data, where)
    _unknown(d, _TOP_KEYS, where)
    chem = _chemistry(d, where)
    dbc = Path(_text(_req(d, "dbc", where), f"{where}.dbc"))
    if not dbc.is_absolute():
        dbc = (base_dir / dbc).resolve()
    checks = _mapping(d.get("checks") or {}, f"{where}.checks")
    status = _mapping(d.get("status") or {}, f"{where}.status")
    temps = d.get("cell_temperatures")
    n_cells = _count(_req(d, "cells", where), f"{where}.cells", 1)
    n_temps = _count(d.get("temperature_sensors", 0), f"{where}.temperature_sensors", 0)
    poll = _poll(d["poll"], where, {"cell_voltages": n_cells, "cell_temperatures": n_temps}) if "poll" in d else None
    # cells a car gives only on request, or not at all (pack-level: the average cell): no broadcast groups
    cells = d.get("cell_voltages")
    vehicle, vehicle_status = _vehicle_bms(d.get("vehicle_bms"), where, poll)
    ocv_file, ocv_sigma = _ocv(d.get("ocv"), base_dir, f"{where}.ocv")
    return PackConfig(
        pack_id=_text(d.get("pack_id", "pack0"), f"{where}.pack_id"),
        dbc_path=dbc,
        dbc_strict=_bool(d.get("dbc_strict", True), f"{where}.dbc_strict"),
        chemistry=chem,
        n_cells=n_cells,
        n_temps=n_temps,
        design_capacity_ah=_capacity(d, where),
        pack_voltage=_scalar(_req(d, "pack_voltage", where), f"{where}.pack_voltage"),
        pack_current=_scalar(_req(d, "pack_current", where), f"{where}.pack_current"),
        cell_voltages=_groups(cells, f"{where}.cell_voltages") if cells is not None else (),
        cell_temperatures=_groups(temps, f"{where}.cell_temperatures") if temps else (),
        status={**{_text(k, f"{where}.status key"): _scalar(v, f"{where}.status.{k}") for k, v in status.items()},
                **vehicle_status},
        checks=tuple(_check(name, c, where) for name, c in checks.items()),
        source=source,
        poll=poll,
        limits=_mapping(d.get("limits") or {}, f"{where}.limits"),
        vehicle_bms=vehicle,
        ocv_file=ocv_file,
        ocv_sigma_v=ocv_sigma,
    )


def _ocv(v: Any, base_dir: Path, where: str) -> tuple[Path | None, float]:
    """The optional ``ocv:`` section: ``file`` (csv soc,volts; relative to the config) and ``sigma_v``."""
    if v is None:
        return None, 0.003
    d = _mapping(v, where)
    _unknown(d, {"file", "sigma_v"}, where)
    f = Path(str(_req(d, "file", where)))
    f = f if f.is_absolute() else (base_dir / f).resolve()
    if not f.is_file():
        raise PackConfigError(f"{where}.file: OCV table not found: {f}")
    sigma = _num(d.get("sigma_v", 0.003), f"{where}.sigma_v")
    if not 0.0 < sigma < 0.5:
        raise PackConfigError(f"{where}.sigma_v: must be between 0 and 0.5 V, got {sigma}")
    return f, sigma


def load_pack_config(path: str | Path, dbc: str | Path | None = None) -> PackConfig:
    """Read and validate a pack config YAML; ``dbc`` overrides its DBC path."""
    p = Path(path)
    data = load_yaml(p, "pack config", PackConfigError, PackConfigError)
    cfg = parse_pack_config(data, p.parent.resolve(), p)
    if dbc is not None:
        from dataclasses import replace

        cfg = replace(cfg, dbc_path=Path(dbc).resolve())
    return cfg


def validate_against_dbc(cfg: PackConfig, db: Database) -> None:
    """Check that every referenced message and signal exists, and indices fit."""
    v = _DbcCheck(db, str(cfg.source) if cfg.source else "pack config")
    where = v.where
    for key in ("pack_voltage", "pack_current"):
        s: ScalarMap = getattr(cfg, key)
        m = v.msg(s.message, f"{where}.{key}")
        v.sig(m, s.signal, f"{where}.{key}.signal")
        v.sig(m, s.valid, f"{where}.{key}.valid")
    for k, s in cfg.status.items():
        m = v.msg(s.message, f"{where}.status.{k}")
        v.sig(m, s.signal, f"{where}.status.{k}.signal")
    for key, n in (("cell_voltages", cfg.cell_channels), ("cell_temperatures", cfg.n_temps)):
        v.array(key, getattr(cfg, key), n, polled_indices(cfg.poll, key))
    for c in cfg.checks:
        v.check(c)


class _DbcCheck:
    """Lookups into the DBC whose errors name the config entry and what the DBC has instead."""

    def __init__(self, db: Database, where: str) -> None:
        self.db, self.where = db, where

    def msg(self, name: str, w: str):
        try:
            return self.db.get_message_by_name(name)
        except KeyError:
            names = sorted(m.name for m in self.db.messages)
            raise PackConfigError(f"{w}: message '{name}' is not in the DBC; it has {names}") from None

    @staticmethod
    def sig(m, name: str | None, w: str) -> None:
        if name is None:
            return
        try:
            m.get_signal_by_name(name)
        except KeyError:
            raise PackConfigError(
                f"{w}: signal '{name}' is not in message '{m.name}'; it has {[s.name for s in m.signals]}"
            ) from None

    def array(self, key: str, groups: tuple[ArrayGroup, ...], n: int, polled: set[int] = frozenset()) -> None:
        """Every element 0..n-1 of an array quantity is carried by some signal or poll, and no index falls outside."""
        covered: set[int] = set(polled)
        for i, g in enumerate(groups):
            w = f"{self.where}.{key}[{i}]"
            m = self.msg(g.message, w)
            for s in g.slots + tuple(x for x in g.invalid if x) + tuple(g.signals):
                self.sig(m, s, w)
            if g.slots:
                for mux in _mux_values(m, g.slots[0]):
                    covered.update(mux * g.per_mux + slot + g.offset for slot in range(len(g.slots)))
            covered.update(g.signals.values())
        bad = sorted(i for i in covered if not 0 <= i < n)
        if bad:
            raise PackConfigError(
                f"{self.where}.{key}: indices {bad[:5]} outside 0..{n - 1} (check per_mux/offset and the count)")
        missing = sorted(set(range(n)) - covered)
        if missing and n:
            raise PackConfigError(f"{self.where}.{key}: no signal maps to element(s) {missing[:8]} of {n} (nor does a poll)")

    def check(self, c: MessageCheck) -> None:
        """The counter and checksum signals exist; a checksum fills one whole byte."""
        w = f"{self.where}.checks.{c.message}"
        m = self.msg(c.message, w)
        self.sig(m, c.counter, f"{w}.counter")
        self.sig(m, c.crc_signal, f"{w}.crc.signal")
        if c.crc_signal:
            s = m.get_signal_by_name(c.crc_signal)
            if s.length != 8 or s.start % 8 != 0:
                raise PackConfigError(f"{w}.crc: checksum signal must be one whole byte")


def _mux_values(message, signal_name: str) -> list[int]:
    s = message.get_signal_by_name(signal_name)
    ids = s.multiplexer_ids
    return list(ids) if ids else [0]
