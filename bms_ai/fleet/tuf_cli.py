"""`bms-ai fleet tuf {init,publish,refresh,serve}`: keep and serve the signed model repository.

Keys are read from files in ``--keys`` only (never from arguments or the
environment), and nothing here prints key material.
"""

from __future__ import annotations

import argparse
from datetime import timedelta

from bms_ai.fleet.tufrepo import ROLES, TufPublisher, TufRepoError, make_server


def _expiry(items: list[str]) -> dict[str, timedelta]:
    """``ROLE=DAYS`` items -> expiry periods (one-line error on anything else)."""
    out = {}
    for item in items:
        role, sep, days = item.partition("=")
        try:
            value = float(days)
        except ValueError:
            value = float("nan")
        if not sep or role not in ROLES or not value > 0:
            raise TufRepoError(f"--expiry: expected ROLE=DAYS with ROLE in {', '.join(ROLES)} and DAYS > 0, got {item!r}")
        out[role] = timedelta(days=value)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Sub-commands and their options."""
    sub = p.add_subparsers(dest="tuf_command", metavar="TUF_COMMAND", required=True)

    def repo_keys(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--repo", required=True, help="repository directory (served as it is)")
        sp.add_argument("--keys", required=True, help="key directory: <role>.pem, mode 0700/0600, never served")
        sp.add_argument("--expiry", action="append", default=[], metavar="ROLE=DAYS",
                        help="signature lifetime of a role (defaults: root 365, targets 90, snapshot 7, timestamp 1)")

    repo_keys(sub.add_parser("init", help="create keys (one ed25519 key per role) and version 1 of every role"))
    sp = sub.add_parser("publish", help="sign and publish a model: its .onnx and manifest entry")
    repo_keys(sp)
    sp.add_argument("model", help="the .onnx file; its entry is read from <model>.json unless --entry is given")
    sp.add_argument("--entry", help="manifest entry JSON of the model")
    repo_keys(sub.add_parser("refresh", help="re-sign snapshot and timestamp with fresh expiries (run daily)"))
    sp = sub.add_parser("serve", help="serve the repository over plain HTTP (static files)")
    sp.add_argument("--repo", required=True, help="repository directory")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sp.add_argument("--port", type=int, default=8080, help="port (default 8080)")


def run(args: argparse.Namespace) -> int:
    """Run one repository command; errors are one line (TufRepoError / ValueError)."""
    if args.tuf_command == "serve":
        return _serve(args)
    expiry = _expiry(args.expiry)
    if args.tuf_command == "init":
        pub = TufPublisher.init(args.repo, args.keys, expiry)
        print(f"repository in {pub.repo_dir}, keys in {pub.key_dir}; ship {pub.trusted_root()} to vehicles "
              "as their trusted root")
        return 0
    pub = TufPublisher(args.repo, args.keys, expiry)
    if args.tuf_command == "refresh":
        print(f"timestamp version {pub.refresh()}")
        return 0
    entry = None
    if args.entry:
        from bms_ai.core.files import load_json
        from bms_ai.models.manifest import ModelEntry

        entry = ModelEntry.from_dict(load_json(args.entry, "model entry"), args.entry)
    row = pub.publish(args.model, entry)
    if row is None:
        print(f"{args.model}: this version is already published")
    else:
        print(f"published {row.name}@{row.version} for {row.task}/{row.chemistry} "
              f"(targets version {pub.targets().version})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        server = make_server(args.repo, args.port, args.host)
    except OSError as exc:
        raise TufRepoError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    host, port = server.server_address[:2]
    print(f"serving {args.repo} at http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
