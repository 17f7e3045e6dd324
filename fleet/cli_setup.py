"""``edgeloop fleet init``, ``fleet keys trust|list`` and ``fleet model add`` (see :mod:`fleet.setup`).

``fleet/cli.py`` calls :func:`register_setup` with its sub-parsers.  Nothing heavy is
imported at module level.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from core.cliutil import add_json_flag, emit

from .cliargs import add_config, fleet_config

__all__ = ["register_setup"]


def register_setup(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``init``, ``keys`` and ``model`` to ``edgeloop fleet``."""
    p = sub.add_parser("init", help="create a fleet: fleet.toml, signing key, broker files, dashboard login",
                       description="Write fleet.toml (fresh secrets), the signing key, the registry and the "
                                   "Mosquitto config, password and ACL files; print the dashboard login once.")
    p.add_argument("--dir", type=Path, default=Path("."), metavar="DIR", help="the fleet's folder (default .)")
    p.add_argument("--broker-port", type=int, default=1883, help="the broker's loopback port (default 1883)")
    p.add_argument("--api-port", type=int, default=8080, help="the API and dashboard port (default 8080)")
    p.add_argument("--force", action="store_true", help="overwrite an existing fleet.toml (new secrets)")
    add_json_flag(p)
    p.set_defaults(func=_cmd_init)

    keys = sub.add_parser("keys", help="public keys the fleet trusts for bundles")
    ksub = keys.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND")
    keys.set_defaults(func=lambda _a: (keys.print_help(), 1)[1])
    p = ksub.add_parser("trust", help="trust bundles signed by this public key (`fleet model add` accepts them)")
    p.add_argument("key", type=Path, metavar="PUB", help="a public key file (.pub, from `edgeloop keys new`)")
    add_config(p)
    add_json_flag(p)
    p.set_defaults(func=_cmd_keys_trust)
    p = ksub.add_parser("list", help="the fleet's own key and every trusted key")
    add_config(p)
    add_json_flag(p)
    p.set_defaults(func=_cmd_keys_list)

    model = sub.add_parser("model", help="register model bundles (no device needs to be online)")
    msub = model.add_subparsers(dest="model_command", metavar="MODEL_COMMAND")
    model.set_defaults(func=lambda _a: (model.print_help(), 1)[1])
    p = msub.add_parser("add", help="verify a bundle against the trusted keys and register it")
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="a signed bundle (.elb)")
    p.add_argument("--status", choices=("accepted", "candidate"), default="accepted",
                   help="accepted (default: may be rolled out) or candidate")
    add_config(p)
    add_json_flag(p)
    p.set_defaults(func=_cmd_model_add)


def _cmd_init(args: argparse.Namespace) -> int:
    from .setup import init_fleet

    res = init_fleet(args.dir, force=args.force, broker_port=args.broker_port, api_port=args.api_port)
    b = res.broker
    perms = ("group mosquitto, 0640: the mosquitto user can read them" if b.readable_by_broker else
             "0600: run mosquitto as this user, or give group mosquitto read access")
    emit(args, res, "\n".join([
        f"wrote {res.config} (mode 0600: broker password, API token) and the fleet in {res.data_dir}",
        f"signing key: {res.public_key} (devices pin this public key)",
        f"broker: mosquitto -c {b.conf_snippet}   (loopback port; password {b.password_file}, "
        f"ACL {b.acl_file}; {perms})",
        f"dashboard: {res.api_url}/dashboard  user {res.admin_user}  password {res.admin_password}",
        "  (shown once; fleet.toml keeps only its hash)",
        "next: `edgeloop fleet serve`, then `edgeloop fleet provision DEVICE`"]))
    return 0


def _cmd_keys_trust(args: argparse.Namespace) -> int:
    from core.signing import load_public_key

    from .setup import trust_key

    dest = trust_key(fleet_config(args), args.key)
    kid = load_public_key(dest).key_id
    emit(args, {"key_id": kid, "path": str(dest)}, f"trusting key {kid} ({dest})")
    return 0


def _cmd_keys_list(args: argparse.Namespace) -> int:
    from core.signing import load_public_key

    from .setup import trusted_key_paths

    cfg = fleet_config(args)
    rows = [{"key_id": load_public_key(p).key_id, "path": str(p), "own": p == cfg.public_key_path}
            for p in trusted_key_paths(cfg) if p.exists()]
    emit(args, rows, "\n".join(f"{r['key_id']}  {r['path']}{'  (the fleet, signs for devices)' if r['own'] else ''}"
                               for r in rows) or "no keys yet")
    return 0


def _cmd_model_add(args: argparse.Namespace) -> int:
    from .registry import Registry
    from .setup import add_model

    cfg = fleet_config(args)
    reg = Registry.open(cfg.database_url, busy_timeout_ms=cfg.database.busy_timeout_ms)
    try:
        rec = add_model(cfg, reg, args.bundle, status=args.status)
    finally:
        reg.close()
    emit(args, rec, f"registered {rec.name} {rec.version} ({rec.status}, signed for the fleet by {rec.signed_by}); "
                    f"roll it out with `edgeloop fleet rollout {rec.name}:{rec.version}`")
    return 0
