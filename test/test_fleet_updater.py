"""The vehicle's TUF client against a real repository on a real HTTP server on 127.0.0.1.

A new version is installed so the model registry loads it; every attack or
fault is a counted rejection with a reason, and nothing of it reaches the
model directory.
"""

from __future__ import annotations

import shutil
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from testutil import free_port, good_soc_model
from tuf.api.metadata import Metadata, TargetFile
from tuf.api.serialization.json import JSONSerializer

from bms_ai.core.levels import ERROR, OK, WARN
from bms_ai.fleet.tufrepo import TufPublisher, load_signer, make_server
from bms_ai.fleet.updater import ModelUpdater
from bms_ai.models.manifest import write_manifest
from bms_ai.models.runtime import ModelRegistry

ROOT = Path(__file__).resolve().parents[1]


class Fleet:
    """A publisher with its repository served on loopback, and one vehicle (model dir, trusted root, cache)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pub = TufPublisher.init(tmp / "repo", tmp / "keys")
        self.server = make_server(self.pub.repo_dir, free_port())
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.vehicle = tmp / "vehicle"
        self.model_dir = self.vehicle / "models"
        self.model_dir.mkdir(parents=True)
        write_manifest(self.model_dir, [good_soc_model(self.model_dir, 1)])   # the shipped model as version 1
        self.root_file = self.vehicle / "root.json"
        shutil.copy(self.pub.trusted_root(), self.root_file)
        self.updater = ModelUpdater(self.url, self.root_file, self.model_dir, self.vehicle / "tuf")

    def publish(self, version: int, chemistry: str = "nmc"):
        stage = self.tmp / f"stage_{chemistry}_{version}"
        stage.mkdir()
        entry = good_soc_model(stage, version, chemistry)
        self.pub.publish(stage / entry.file, entry)
        return entry

    def model_files(self) -> set[str]:
        return {p.name for p in self.model_dir.iterdir()}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fleet(tmp_path: Path):
    f = Fleet(tmp_path)
    yield f
    f.close()


def _sign_and_write(pub: TufPublisher, md: Metadata, role: str, signer) -> None:
    md.signatures.clear()
    md.sign(signer, append=True)
    data = md.to_bytes(JSONSerializer(compact=False))
    if role != "timestamp":
        (pub.metadata_dir / f"{md.signed.version}.{role}.json").write_bytes(data)
    (pub.metadata_dir / f"{role}.json").write_bytes(data)


def test_installs_a_newer_version_that_the_registry_then_loads(fleet: Fleet) -> None:
    reg = ModelRegistry(fleet.model_dir)
    reg.poll()
    assert reg.get("soc", "nmc").version == 1
    assert fleet.updater.poll().installed == []          # nothing published yet: up to date, no rejection
    entry = fleet.publish(2)
    res = fleet.updater.poll()
    assert res.ok and res.installed == ["soc_eta_nmc@2"], res
    assert {entry.file, f"{entry.file}.json"} <= fleet.model_files()
    assert not [n for n in fleet.model_files() if n.startswith(".")]       # no staged leftovers
    assert reg.poll() and reg.get("soc", "nmc").version == 2
    assert reg.get("soc", "nmc").entry.sha256 == entry.sha256
    # up to date now: the next poll installs nothing and rejects nothing
    again = fleet.updater.poll()
    assert again.ok and again.installed == []
    st = fleet.updater.status()
    assert st.level == OK and st.values["installs"] == 1 and st.values["rejected"] == 0
    assert st.values["installed"] == "soc/nmc=soc_eta_nmc@2" and st.values["model_versions"] == "soc/nmc=2"
    # only the newest version of a slot is installed; other chemistries follow the vehicle's filter
    fleet.publish(3)
    fleet.publish(4)
    fleet.publish(2, "lfp")
    nmc_only = ModelUpdater(fleet.url, fleet.root_file, fleet.model_dir, fleet.vehicle / "tuf", chemistries=("nmc",))
    assert nmc_only.poll().installed == ["soc_eta_nmc@4"]
    assert "soc_eta_nmc_v3.onnx" not in fleet.model_files() and "soc_eta_lfp_v2.onnx" not in fleet.model_files()


def test_tampered_target_is_rejected_and_nothing_installed(fleet: Fleet) -> None:
    entry = fleet.publish(2)
    served = next(fleet.pub.targets_dir.glob(f"*.{entry.file}"))
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0x01                        # one bit flipped on the server (or on the way)
    served.write_bytes(bytes(data))
    before = fleet.model_files()
    res = fleet.updater.poll()
    assert res.installed == [] and [k for k, _ in res.rejections] == ["tampered"], res
    assert "hash" in res.rejections[0][1] and entry.file in res.rejections[0][1]
    assert fleet.model_files() == before
    st = fleet.updater.status()
    assert st.level == WARN and st.values["rejected_tampered"] == 1 and "tampered" in st.message
    reg = ModelRegistry(fleet.model_dir)
    reg.poll()
    assert reg.get("soc", "nmc").version == 1


def test_targets_signed_by_a_wrong_key_are_rejected(fleet: Fleet, tmp_path: Path) -> None:
    """An attacker with the snapshot and timestamp keys (online) but not the targets key adds a model."""
    fleet.publish(2)
    fleet.updater.poll()
    stage = tmp_path / "evil"
    stage.mkdir()
    evil = good_soc_model(stage, 9)
    md = fleet.pub.open("targets")
    tf = TargetFile.from_file(evil.file, str(stage / evil.file), ["sha256"])
    md.signed.targets[evil.file] = tf
    md.signed.version += 1
    (fleet.pub.targets_dir / f"{tf.hashes['sha256']}.{evil.file}").write_bytes((stage / evil.file).read_bytes())
    _sign_and_write(fleet.pub, md, "targets", CryptoSigner.generate_ed25519())
    fleet.pub.do_snapshot()
    fleet.pub.do_timestamp()
    before = fleet.model_files()
    res = fleet.updater.poll()
    assert [k for k, _ in res.rejections] == ["signature"] and res.installed == [], res
    assert "targets" in res.rejections[0][1]
    assert fleet.model_files() == before and fleet.updater.status().level == WARN


def test_expired_timestamp_is_rejected(fleet: Fleet) -> None:
    fleet.publish(2)
    TufPublisher(fleet.pub.repo_dir, fleet.pub.key_dir, expiry={"timestamp": -timedelta(hours=1)}).refresh()
    res = fleet.updater.poll()
    assert [k for k, _ in res.rejections] == ["expired"] and res.installed == [], res
    assert "timestamp" in res.rejections[0][1] and "expired" in res.rejections[0][1]
    assert "soc_eta_nmc_v2.onnx" not in fleet.model_files()


def test_rollback_to_older_metadata_is_rejected(fleet: Fleet) -> None:
    fleet.publish(2)
    old = {n: (fleet.pub.metadata_dir / n).read_bytes() for n in ("timestamp.json", "snapshot.json")}
    old_snapshot_version = fleet.pub.snapshot().version
    fleet.publish(3)
    assert fleet.updater.poll().installed == ["soc_eta_nmc@3"]
    # a mirror replays the older timestamp (which points at the older snapshot and targets)
    (fleet.pub.metadata_dir / "timestamp.json").write_bytes(old["timestamp.json"])
    res = fleet.updater.poll()
    assert [k for k, _ in res.rejections] == ["rollback"], res
    assert "timestamp" in res.rejections[0][1]
    # a stolen timestamp key signs a newer timestamp that points back at the older snapshot
    fleet.pub.refresh()
    md = fleet.pub.open("timestamp")
    md.signed.version += 1
    md.signed.snapshot_meta.version = old_snapshot_version
    md.signed.snapshot_meta.length = len(old["snapshot.json"])
    md.signed.snapshot_meta.hashes = None
    _sign_and_write(fleet.pub, md, "timestamp", load_signer(fleet.pub.key_dir, "timestamp"))
    res = fleet.updater.poll()
    assert [k for k, _ in res.rejections] == ["rollback"], res
    assert "snapshot" in res.rejections[0][1]
    assert fleet.updater.status().values["rejected_rollback"] == 2
    reg = ModelRegistry(fleet.model_dir)
    reg.poll()
    assert reg.get("soc", "nmc").version == 3


def test_unreachable_server_and_bad_configuration_are_reported(fleet: Fleet, tmp_path: Path) -> None:
    down = ModelUpdater(f"http://127.0.0.1:{free_port()}", fleet.root_file, fleet.model_dir, tmp_path / "c1")
    res = down.poll()
    assert [k for k, _ in res.rejections] == ["unreachable"], res
    assert down.status().level == WARN and "\n" not in down.status().message
    missing = ModelUpdater(fleet.url, tmp_path / "nope.json", fleet.model_dir, tmp_path / "c2")
    assert [k for k, _ in missing.poll().rejections] == ["config"]
    assert missing.status().level == ERROR and "trusted root" in missing.status().message
    (tmp_path / "garbage.json").write_text("{}")
    bad = ModelUpdater(fleet.url, tmp_path / "garbage.json", fleet.model_dir, tmp_path / "c3")
    assert [k for k, _ in bad.poll().rejections] == ["config"]
    # a vehicle whose root is another repository's: nothing it serves verifies
    other = TufPublisher.init(tmp_path / "other", tmp_path / "otherkeys")
    stranger = ModelUpdater(fleet.url, other.trusted_root(), fleet.model_dir, tmp_path / "c4")
    fleet.publish(2)
    res = stranger.poll()
    assert [k for k, _ in res.rejections] == ["signature"] and "soc_eta_nmc_v2.onnx" not in fleet.model_files()


def test_disk_errors_and_oversized_targets_are_rejections(fleet: Fleet, tmp_path: Path) -> None:
    fleet.publish(2)
    blocked = tmp_path / "file_not_dir"
    blocked.write_text("")
    disk = ModelUpdater(fleet.url, fleet.root_file, blocked, tmp_path / "c1")
    res = disk.poll()
    assert [k for k, _ in res.rejections] == ["disk"], res
    small = ModelUpdater(fleet.url, fleet.root_file, fleet.model_dir, tmp_path / "c2", max_target_bytes=1000)
    res = small.poll()
    assert [k for k, _ in res.rejections] == ["invalid"] and "more than 1000" in res.rejections[0][1]
    assert "soc_eta_nmc_v2.onnx" not in fleet.model_files()
    assert fleet.updater.poll().installed == ["soc_eta_nmc@2"]   # the same repository is fine otherwise


def test_signed_entry_that_does_not_describe_its_model_is_rejected(fleet: Fleet, tmp_path: Path) -> None:
    """Even with the targets key (a publisher bug or a stolen key): the entry must name the signed file's hash."""
    import json

    stage = tmp_path / "odd"
    stage.mkdir()
    entry = good_soc_model(stage, 5)
    wrong = dict(entry.to_dict(), sha256="0" * 64)
    info = {"name": entry.name, "task": "soc", "chemistry": "nmc", "version": 5, "entry": f"{entry.file}.json"}
    with fleet.pub.edit_targets() as targets:
        fleet.pub._add_target(targets, entry.file, (stage / entry.file).read_bytes(), {"kind": "model", **info})
        fleet.pub._add_target(targets, f"{entry.file}.json", json.dumps(wrong).encode(), {"kind": "entry", **info})
        fleet.pub._add_index(targets)
    fleet.pub.do_snapshot()
    fleet.pub.do_timestamp()
    before = fleet.model_files()
    res = fleet.updater.poll()
    assert [k for k, _ in res.rejections] == ["invalid"] and "not the signed model" in res.rejections[0][1], res
    assert fleet.model_files() == before


@pytest.mark.parametrize(("row", "says"), [
    ("x", "not an object"),
    ({"name": "m", "task": "soc", "chemistry": "nmc", "version": -1, "file": "m.onnx", "entry": "m.onnx.json"},
     "malformed row"),
    ({"name": "m", "task": "soc", "chemistry": "nmc", "version": 1, "file": "../m.onnx", "entry": "../m.onnx.json"},
     "not a plain file name"),
    ({"name": "m", "task": "soc", "chemistry": "nmc", "version": 1, "file": "m.onnx", "entry": "other.json"},
     "not a model and its entry"),
])
def test_index_rows_are_checked(row, says) -> None:
    from bms_ai.fleet.updater import Offer, Rejected

    with pytest.raises(Rejected, match=says):
        Offer.from_row(row)
