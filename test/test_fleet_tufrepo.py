"""The TUF publisher: keys in files, signed roles with versions and expiries, model targets, index, CLI, server."""

from __future__ import annotations

import json
import os
import stat
import threading
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from testutil import free_port, good_soc_model
from tuf.api.metadata import Metadata

from bms_ai.fleet.tufrepo import INDEX, ROLES, TufPublisher, TufRepoError, key_path, load_signer, make_server


@pytest.fixture
def pub(tmp_path: Path) -> TufPublisher:
    return TufPublisher.init(tmp_path / "repo", tmp_path / "keys")


def _stage(tmp_path: Path, version: int, chemistry: str = "nmc"):
    stage = tmp_path / f"stage{version}{chemistry}"
    stage.mkdir()
    entry = good_soc_model(stage, version, chemistry)
    return stage / entry.file, entry


def _md(pub: TufPublisher, role: str) -> Metadata:
    return Metadata.from_file(str(pub.metadata_dir / f"{role}.json"))


def test_init_writes_protected_keys_and_signed_roles(pub: TufPublisher, tmp_path: Path) -> None:
    kdir = tmp_path / "keys"
    assert stat.S_IMODE(kdir.stat().st_mode) == 0o700
    for role in ROLES:
        assert stat.S_IMODE(key_path(kdir, role).stat().st_mode) == 0o600
    root = _md(pub, "root")
    assert root.signed.consistent_snapshot and root.signed.version == 1
    assert {r: len(root.signed.roles[r].keyids) for r in ROLES} == {r: 1 for r in ROLES}
    for role in ROLES:  # every role is signed by the key root names for it
        md = _md(pub, role)
        root.signed.verify_delegate(role, md.signed_bytes, md.signatures)
        assert md.signed.expires > datetime.now(timezone.utc)
    assert (pub.metadata_dir / "1.root.json").is_file() and pub.trusted_root().read_bytes() == \
        (pub.metadata_dir / "root.json").read_bytes()
    # no key material anywhere in the served tree
    for f in pub.repo_dir.rglob("*"):
        assert not f.is_file() or b"PRIVATE KEY" not in f.read_bytes(), f
    with pytest.raises(TufRepoError, match="a repository exists here already"):
        TufPublisher.init(tmp_path / "repo", tmp_path / "keys2")
    with pytest.raises(TufRepoError, match="refusing to overwrite keys"):
        TufPublisher.init(tmp_path / "repo2", kdir)


def test_publish_adds_model_entry_and_index_with_custom_info(pub: TufPublisher, tmp_path: Path) -> None:
    f, entry = _stage(tmp_path, 2)
    row = pub.publish(f, entry)
    assert row is not None and (row.task, row.chemistry, row.version, row.file) == ("soc", "nmc", 2, entry.file)
    targets = _md(pub, "targets").signed
    assert set(targets.targets) == {entry.file, f"{entry.file}.json", INDEX}
    model = targets.targets[entry.file]
    assert model.custom["bms_ai"] == {"kind": "model", "name": entry.name, "task": "soc", "chemistry": "nmc",
                                      "version": 2, "entry": f"{entry.file}.json"}
    assert model.hashes["sha256"] == entry.sha256 and model.length == f.stat().st_size
    # content-addressed files hold exactly what the metadata promises
    for path, tf in targets.targets.items():
        data = (pub.targets_dir / f"{tf.hashes['sha256']}.{path}").read_bytes()
        tf.verify_length_and_hashes(data)
    published_entry = json.loads((pub.targets_dir / f"{targets.targets[entry.file + '.json'].hashes['sha256']}."
                                                      f"{entry.file}.json").read_text())
    assert published_entry == entry.to_dict()
    index = json.loads((pub.targets_dir / f"{targets.targets[INDEX].hashes['sha256']}.{INDEX}").read_text())
    assert index["models"] == [row.to_dict()]
    # every publish is a new targets, snapshot and timestamp version; snapshot and timestamp point to them
    assert (targets.version, _md(pub, "snapshot").signed.version, _md(pub, "timestamp").signed.version) == (2, 2, 2)
    assert _md(pub, "snapshot").signed.meta["targets.json"].version == 2
    assert _md(pub, "timestamp").signed.snapshot_meta.version == 2
    assert (pub.metadata_dir / "2.targets.json").is_file() and (pub.metadata_dir / "2.snapshot.json").is_file()
    # a second chemistry and a newer version add rows; the old version stays listed
    pub.publish(*_stage(tmp_path, 3))
    pub.publish(*_stage(tmp_path, 2, "lfp"))
    assert [(r.chemistry, r.version) for r in pub.published()] == [("lfp", 2), ("nmc", 2), ("nmc", 3)]
    assert _md(pub, "targets").signed.version == 4


def test_publish_refuses_what_vehicles_must_not_get(pub: TufPublisher, tmp_path: Path) -> None:
    f, entry = _stage(tmp_path, 2)
    pub.publish(f, entry)
    assert pub.publish(f, entry) is None                      # the same version again: nothing to do
    assert _md(pub, "targets").signed.version == 2
    f1, e1 = _stage(tmp_path, 1)
    with pytest.raises(TufRepoError, match="version 1 is not newer than the published version 2"):
        pub.publish(f1, e1)
    f3, e3 = _stage(tmp_path, 3)
    f3.write_bytes(f3.read_bytes() + b"\0")                   # the file is not what its entry describes
    with pytest.raises(TufRepoError, match="differs from its entry"):
        pub.publish(f3, e3)
    with pytest.raises(TufRepoError, match="names file"):
        pub.publish(f, e3)
    # the entry comes from the sidecar <file>.json when not given
    f4, e4 = _stage(tmp_path, 4)
    Path(f"{f4}.json").write_text(json.dumps(e4.to_dict()))
    assert pub.publish(f4).version == 4
    with pytest.raises(ValueError, match="model entry"):
        pub.publish(f1)                                       # no sidecar


def test_keys_are_checked_before_signing(pub: TufPublisher, tmp_path: Path) -> None:
    kdir = tmp_path / "keys"
    os.chmod(key_path(kdir, "targets"), 0o644)
    with pytest.raises(TufRepoError, match=r"accessible by others \(mode 644\); chmod 600"):
        load_signer(kdir, "targets")
    os.chmod(key_path(kdir, "targets"), 0o600)
    # keys of another repository are refused, naming the file, never showing its content
    TufPublisher.init(tmp_path / "other", tmp_path / "otherkeys")
    stranger = TufPublisher(tmp_path / "repo", tmp_path / "otherkeys")
    with pytest.raises(TufRepoError, match="not a targets key of this repository's root") as err:
        stranger.publish(*_stage(tmp_path, 2))
    assert "PRIVATE" not in str(err.value)
    key_path(tmp_path / "otherkeys", "snapshot").write_text("not a key")
    with pytest.raises(TufRepoError, match="not an unencrypted PKCS#8 PEM private key"):
        load_signer(tmp_path / "otherkeys", "snapshot")
    with pytest.raises(TufRepoError, match="key not readable"):
        load_signer(tmp_path / "nokeys", "root")


def test_refresh_resigns_timestamp_with_the_configured_expiry(pub: TufPublisher, tmp_path: Path) -> None:
    ts0 = _md(pub, "timestamp").signed
    short = TufPublisher(pub.repo_dir, pub.key_dir, expiry={"timestamp": timedelta(minutes=5)})
    assert short.refresh() == ts0.version + 1
    ts = _md(pub, "timestamp").signed
    assert ts.snapshot_meta.version == _md(pub, "snapshot").signed.version
    assert timedelta(minutes=4) < ts.expires - datetime.now(timezone.utc) <= timedelta(minutes=5)


def test_cli_init_publish_refresh_and_serve(tmp_path: Path, capsys) -> None:
    from bms_ai.cli import main

    repo, keys = tmp_path / "repo", tmp_path / "keys"
    assert main(["fleet", "tuf", "init", "--repo", str(repo), "--keys", str(keys)]) == 0
    f, entry = _stage(tmp_path, 2)
    Path(f"{f}.json").write_text(json.dumps(entry.to_dict()))
    assert main(["fleet", "tuf", "publish", "--repo", str(repo), "--keys", str(keys), str(f)]) == 0
    assert main(["fleet", "tuf", "publish", "--repo", str(repo), "--keys", str(keys), str(f)]) == 0  # no-op
    assert main(["fleet", "tuf", "refresh", "--repo", str(repo), "--keys", str(keys)]) == 0
    out = capsys.readouterr()
    assert "1.root.json" in out.out and "published soc_eta_nmc@2" in out.out and "already published" in out.out
    for k in keys.iterdir():   # key material never reaches the terminal
        assert k.read_text().splitlines()[1] not in out.out + out.err
    f1, e1 = _stage(tmp_path, 1)
    Path(f"{f1}.json").write_text(json.dumps(e1.to_dict()))
    assert main(["fleet", "tuf", "publish", "--repo", str(repo), "--keys", str(keys), str(f1)]) == 1
    assert "not newer than the published version 2" in capsys.readouterr().err
    assert main(["fleet", "tuf", "serve", "--repo", str(tmp_path / "none"), "--port", "0"]) == 1
    assert "not a repository" in capsys.readouterr().err


def test_server_serves_the_repository_on_loopback(pub: TufPublisher) -> None:
    server = make_server(pub.repo_dir, free_port())
    assert server.server_address[0] == "127.0.0.1"
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metadata/timestamp.json"
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.read() == (pub.metadata_dir / "timestamp.json").read_bytes()
    finally:
        server.shutdown()
        server.server_close()
