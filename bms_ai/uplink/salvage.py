"""Salvage the complete chunks of an MCAP segment whose writer died (crash, kill -9).

The writer flushes each finished chunk to the file, so a half-written segment
holds every chunk but the open one. We re-read it as a stream, keep every
record of chunks whose CRC checks out, stop at the first damaged or truncated
record, and write those messages into a new, properly finished MCAP file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from mcap.records import Channel, Message, Metadata, Schema
from mcap.stream_reader import StreamReader
from mcap.writer import CompressionType, Writer


def salvage_mcap(src: Path, dst: Path, opener: Callable[[Path], IO[bytes] | Any] | None = None) -> int:
    """Messages recovered into ``dst`` (0: nothing usable; ``dst`` then does not exist).

    ``opener`` creates ``dst`` (the spool's, so the bytes are counted against its quota); metadata records
    (vehicle, class) are kept.
    """
    schemas: dict[int, Schema] = {}
    channels: dict[int, Channel] = {}
    messages: list[Message] = []
    metadata: list[Metadata] = []
    try:
        with open(src, "rb") as f:
            for rec in StreamReader(f, validate_crcs=True).records:
                if isinstance(rec, Schema):
                    schemas[rec.id] = rec
                elif isinstance(rec, Channel):
                    channels[rec.id] = rec
                elif isinstance(rec, Message):
                    messages.append(rec)
                elif isinstance(rec, Metadata):
                    metadata.append(rec)
    except Exception:  # noqa: BLE001 - truncation/corruption ends the usable part, whatever the error type
        pass
    messages = [m for m in messages if m.channel_id in channels and channels[m.channel_id].schema_id in schemas]
    if not messages:
        return 0
    out = (opener or (lambda p: open(p, "xb")))(dst)  # noqa: SIM115 - closed below
    try:
        w = Writer(out, compression=CompressionType.ZSTD)
        w.start(profile="ros2", library="bms_ai.uplink.salvage")
        for md in metadata:
            w.add_metadata(md.name, dict(md.metadata))
        sid_map = {sid: w.register_schema(s.name, s.encoding, s.data) for sid, s in schemas.items()}
        cid_map = {cid: w.register_channel(c.topic, c.message_encoding, sid_map[c.schema_id], dict(c.metadata))
                   for cid, c in channels.items() if c.schema_id in sid_map}
        for m in messages:
            w.add_message(cid_map[m.channel_id], log_time=m.log_time, data=m.data, publish_time=m.publish_time,
                          sequence=m.sequence)
        w.finish()
    finally:
        out.close()
    return len(messages)
