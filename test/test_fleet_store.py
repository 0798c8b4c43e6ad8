"""Fleet object store: the same behaviour from a local folder and from S3 (moto's server on 127.0.0.1)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from testutil import moto_s3

from bms_ai.fleet.store import LocalStore, ObjectStore, S3Store, open_store

BUCKET = "bms-fleet-store-test"


def _exercise(st: ObjectStore) -> None:
    st.put("segments/p-1/2026-01-01/a.mcap", b"one")
    st.put("segments/p-1/2026-01-02/b.mcap", b"two")
    st.put("segments/p-2/2026-01-01/c.mcap", b"three")
    st.put("timelines/x.parquet", b"t")
    st.put("segments/p-1/2026-01-01/a.mcap", b"one again")          # replaced whole
    assert st.get("segments/p-1/2026-01-01/a.mcap") == b"one again"
    assert st.exists("segments/p-2/2026-01-01/c.mcap")
    assert not st.exists("segments/p-3/none.mcap")
    with pytest.raises(KeyError):
        st.get("segments/p-3/none.mcap")
    assert list(st.list("segments/p-1/")) == ["segments/p-1/2026-01-01/a.mcap", "segments/p-1/2026-01-02/b.mcap"]
    assert list(st.list("segments/p")) == ["segments/p-1/2026-01-01/a.mcap", "segments/p-1/2026-01-02/b.mcap",
                                           "segments/p-2/2026-01-01/c.mcap"]
    assert len(list(st.list())) == 4
    assert list(st.list("nothing/")) == []
    again = pickle.loads(pickle.dumps(st))          # how Ray ships it to a worker: reopened there
    assert type(again) is type(st) and again.get("timelines/x.parquet") == b"t"


def test_local_store_put_get_list_exists(tmp_path: Path) -> None:
    """A folder store: put replaces atomically, list is sorted by key and by prefix, pickles as its URL."""
    st = open_store(str(tmp_path / "fleet"))
    assert isinstance(st, LocalStore)
    _exercise(st)
    assert not [p for p in (tmp_path / "fleet").rglob(".tmp-*")]     # no temp file left behind
    assert open_store(st.url).get("timelines/x.parquet") == b"t"     # file:// URL of the same folder


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", ""])
def test_keys_cannot_leave_the_store(tmp_path: Path, key: str) -> None:
    """A key with '..', a leading slash or empty parts is a one-line ValueError, nothing written."""
    st = open_store(str(tmp_path))
    with pytest.raises(ValueError, match="relative path"):
        st.put(key, b"x")
    assert list(tmp_path.iterdir()) == []


def test_unknown_scheme_names_the_choices() -> None:
    """An unsupported URL is refused with the registered kinds."""
    with pytest.raises(ValueError, match="unknown.*file.*s3"):
        open_store("ftp://host/x")
    with pytest.raises(ValueError, match="bucket"):
        open_store("s3:///prefix")


@pytest.mark.drive
def test_s3_store_against_moto_server() -> None:
    """s3://bucket/prefix on an S3-compatible endpoint behaves like the folder (moto's server, 127.0.0.1)."""
    with moto_s3(BUCKET) as (ep, _):
        st = open_store(f"s3://{BUCKET}/run1", ep, access_key="testing", secret_key="testing")
        assert isinstance(st, S3Store) and st.url == f"s3://{BUCKET}/run1/"
        _exercise(st)
        other = open_store(f"s3://{BUCKET}/run2", ep, access_key="testing", secret_key="testing")
        assert list(other.list()) == []                              # the prefix separates runs
