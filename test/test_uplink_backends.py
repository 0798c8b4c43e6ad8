"""Upload backends chosen by name: the registry, its errors, and the directory backend end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from bms_ai.uplink.backends import BACKENDS, DirectoryBackend, HttpBackend, Throttle, make_backend
from bms_ai.uplink.spool import Spool


def test_backends_are_registered_by_kind() -> None:
    """Config names the kind; the registry maps it to the class (the s3 one is not built: boto3 is optional)."""
    assert BACKENDS.names() == ["http", "s3", "directory"]
    assert BACKENDS.get("http") is HttpBackend
    assert isinstance(make_backend({"kind": "http", "url": "http://127.0.0.1:1/ingest"}), HttpBackend)


@pytest.mark.parametrize("config", [{"kind": "ftp"}, {"url": "http://127.0.0.1:1"}])
def test_unknown_backend_kind_is_one_line_naming_the_choices(config: dict) -> None:
    """A typo in the config (or no kind at all) names what would have worked, in one line."""
    with pytest.raises(ValueError, match=r"unknown upload backend '(ftp|None)'; known: http, s3, directory$"):
        make_backend(config)


def test_directory_backend_is_idempotent_by_hash(tmp_path: Path) -> None:
    """The same segment twice is stored once: 'created' then 'duplicate'."""
    sp = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    part = sp.new_part_path()
    part.write_bytes(b"segment" * 100)
    seg = sp.commit(part, "raw")
    assert seg is not None
    be = make_backend({"kind": "directory", "path": str(tmp_path / "out")})
    assert isinstance(be, DirectoryBackend)
    results = []
    for _ in range(2):
        with open(seg.path, "rb") as f:
            results.append(be.upload(seg, f, Throttle(), {"X-BMS-Class": "raw"}))
    assert results == ["created", "duplicate"]
    assert (tmp_path / "out" / seg.path.name).read_bytes() == seg.path.read_bytes()
    sp.close()
