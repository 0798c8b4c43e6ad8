"""A simulated BMS diagnostic ECU for tests: real ISO-TP (can-isotp) and UDS responses (udsoncan) on a virtual bus.

It answers the identifiers it is given with fixed data, can stay silent, answer
negatively or ask for more time first, and records when each request came and
whether one arrived while it was still busy with the previous one.
Also holds the Kona BMS poll layout the tests share (after OVMS's
vehicle_kianiroev module: 22 01 01..01 05 on 0x7E4 -> 0x7EC, 98 cells).
"""

from __future__ import annotations

import threading
import time

import numpy as np

KONA_CELLS = 98
KONA_TEMPS = 4


def kona_poll(period: float = 1.0, min_gap: float = 0.02, timeout: float = 0.3) -> dict:
    """The ``poll:`` section for a Kona/Niro 64 kWh BMS (byte positions as OVMS reads them)."""
    def req(did: int, values: dict) -> dict:
        return {"request_id": 0x7E4, "response_id": 0x7EC, "service": 0x22, "did": did, "period": period,
                "padding": 0xAA, "values": values}
    return {"min_gap": min_gap, "timeout": timeout, "requests": [
        req(0x0101, {"soc_bms": {"start": 4, "scale": 0.5},
                     "bms_current": {"start": 10, "bytes": 2, "signed": True, "scale": 0.1},
                     "bms_voltage": {"start": 12, "bytes": 2, "scale": 0.1},
                     "cell_temperatures": {"start": 16, "count": 4, "signed": True}}),
        req(0x0102, {"cell_voltages": {"start": 4, "count": 32, "scale": 0.02, "index": 0}}),
        req(0x0103, {"cell_voltages": {"start": 4, "count": 32, "scale": 0.02, "index": 32}}),
        req(0x0104, {"cell_voltages": {"start": 4, "count": 32, "scale": 0.02, "index": 64}}),
        req(0x0105, {"soh": {"start": 25, "bytes": 2, "scale": 0.1},
                     "soc_display": {"start": 31, "scale": 0.5},
                     "cell_voltages": {"start": 34, "count": 2, "scale": 0.02, "index": 96}}),
    ]}


def kona_cells() -> np.ndarray:
    """A known 98-cell vector on the BMS's 20 mV grid, distinct enough to catch an index mix-up."""
    return 3.50 + 0.02 * (np.arange(KONA_CELLS) % 17)


def kona_data(cells: np.ndarray, temps=(21, 22, 23, -4), soh=97.5, soc=58.5) -> dict[int, bytes]:
    """Answer data (after 62 + identifier) of each Kona identifier for the given pack state."""
    raw = np.rint(np.asarray(cells) / 0.02).astype(np.uint8)
    p1 = bytearray(59)
    p1[4] = int(soc * 2)
    p1[10:12] = (-123).to_bytes(2, "big", signed=True)  # -12.3 A
    p1[12:14] = (3605).to_bytes(2, "big")  # 360.5 V
    p1[16:20] = bytes(t & 0xFF for t in temps)
    pages = {0x0101: bytes(p1)}
    for k, did in enumerate((0x0102, 0x0103, 0x0104)):
        pages[did] = b"\xff" * 4 + raw[32 * k:32 * k + 32].tobytes()
    p5 = bytearray(43)
    p5[25:27] = int(round(soh * 10)).to_bytes(2, "big")
    p5[31] = int(soc * 2)
    p5[34:36] = raw[96:98].tobytes()
    pages[0x0105] = bytes(p5)
    return pages


class SimEcu:
    """A diagnostic ECU on python-can's in-process ``virtual`` bus, answering through a real ISO-TP stack."""

    def __init__(self, channel: str, data: dict[int, bytes], rx_id: int = 0x7E4, tx_id: int = 0x7EC,
                 extended: bool = False, service: int = 0x22, delay: float = 0.0) -> None:
        import can
        import isotp

        self.data = dict(data)
        self.service = service
        self.delay = delay  # seconds before answering (a busy BMS)
        self.silent = False
        self.negative: dict[int, int] = {}  # identifier -> negative response code
        self.pending_first: set[int] = set()  # identifiers answered "response pending" before the data
        self.requests: list[tuple[float, bytes]] = []  # (monotonic time, request payload)
        self.overlaps = 0  # requests that arrived while the previous one was still being answered
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.notifier = can.Notifier(self.bus, [], timeout=0.01)
        mode = isotp.AddressingMode.Normal_29bits if extended else isotp.AddressingMode.Normal_11bits
        self.stack = isotp.NotifierBasedCanStack(self.bus, self.notifier, address=isotp.Address(
            mode, txid=tx_id, rxid=rx_id), params={"tx_padding": 0xAA, "blocking_send": False})
        self.stack.start()
        self._busy = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _answer(self, req: bytes) -> list[bytes]:
        from udsoncan import Response, services

        did = int.from_bytes(req[1:3], "big")
        if req[0] != self.service or did not in self.data:
            return [Response(services.ReadDataByIdentifier, Response.Code.RequestOutOfRange).get_payload()]
        if did in self.negative:
            return [bytes([0x7F, req[0], self.negative[did]])]
        ok = Response(services.ReadDataByIdentifier, Response.Code.PositiveResponse,
                      data=req[1:3] + self.data[did]).get_payload()
        if did in self.pending_first:
            return [Response(services.ReadDataByIdentifier, Response.Code.RequestCorrectlyReceived_ResponsePending)
                    .get_payload(), ok]
        return [ok]

    def _serve(self) -> None:
        while not self._stop.is_set():
            req = self.stack.recv(block=True, timeout=0.02)
            if req is None:
                continue
            if self._busy:
                self.overlaps += 1
            self.requests.append((time.monotonic(), bytes(req)))
            if self.silent:
                continue
            self._busy = True
            threading.Thread(target=self._reply, args=(bytes(req),), daemon=True).start()

    def _reply(self, req: bytes) -> None:
        try:
            for payload in self._answer(req):
                if self.delay:
                    time.sleep(self.delay)
                self.stack.send(payload)
                while self.stack.transmitting() and not self._stop.is_set():
                    time.sleep(0.001)
        finally:
            self._busy = False

    def close(self) -> None:
        """Stop answering and release the stack, notifier and bus."""
        self._stop.set()
        self._thread.join(2.0)
        self.stack.stop()
        self.notifier.stop()
        self.bus.shutdown()
