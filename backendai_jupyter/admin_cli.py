"""``backendai-jupyter admin``: users, resource policies and agents, through the gateway's API."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from urllib.parse import quote

from .common.clientconfig import ClientConfig, default_path
from .common.errors import ApiError


def _slots(text: str) -> dict[str, str]:
    """``cpu=4,mem=16g,cuda.device=2`` → a slot map."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected SLOT=AMOUNT, got {part!r}")
        out[key.strip()] = value.strip()
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="backendai-jupyter admin", description=__doc__)
    ap.add_argument("--json", action="store_true", help="print JSON for scripts")
    sub = ap.add_subparsers(dest="what", required=True)

    users = sub.add_parser("users", help="manage users").add_subparsers(dest="verb", required=True)
    create = users.add_parser("create", help="create a user; prints its keypair")
    create.add_argument("name")
    create.add_argument("--admin", action="store_true")
    create.add_argument("--policy")
    create.add_argument("--json", action="store_true", help="print JSON for scripts")
    users.add_parser("list")
    for verb in ("disable", "enable", "delete"):
        users.add_parser(verb).add_argument("name")
    users.add_parser("rotate-token", help="a new API token; the old one stops working").add_argument("name")
    users.add_parser("rotate-keypair", help="a new keypair; the old one stops working").add_argument("name")
    setp = users.add_parser("set-policy", help="give a user a resource policy ('none' removes it)")
    setp.add_argument("name")
    setp.add_argument("policy")

    policies = sub.add_parser("policies", help="manage resource policies").add_subparsers(
        dest="verb", required=True
    )
    policies.add_parser("list")
    pset = policies.add_parser("set", help="create or replace a policy")
    pset.add_argument("name")
    pset.add_argument("--max-sessions", type=int, help="sessions at once (pending ones count)")
    pset.add_argument("--max-session-resources", type=_slots, default={}, metavar="SLOT=AMOUNT,...")
    pset.add_argument("--total-resources", type=_slots, default={}, metavar="SLOT=AMOUNT,...")
    pset.add_argument("--allowed-images", default="", help="comma-separated names or patterns (empty: all)")
    pset.add_argument("--max-vfolders", type=int, help="vfolders a user may own (the trash counts)")
    pset.add_argument("--max-quota", help="the user's vfolder quotas added up, e.g. 100g")
    policies.add_parser("delete").add_argument("name")

    agents = sub.add_parser("agents", help="list, drain and undrain agents").add_subparsers(
        dest="verb", required=True
    )
    agents.add_parser("list")
    agents.add_parser("drain", help="no new kernels there; running ones stay").add_argument("id")
    agents.add_parser("undrain").add_argument("id")
    agents.add_parser(
        "reset", help="forget an agent's key, so that a host that lost it can join again"
    ).add_argument("id")
    return ap


def run(args: argparse.Namespace, call: Any) -> Any:
    """Do what ``args`` say with ``call(method, path, body)``; returns what to print."""
    if args.what == "users":
        if args.verb == "create":
            return call(
                "POST", "/v1/admin/users", {"name": args.name, "is_admin": args.admin, "policy": args.policy}
            )
        if args.verb == "list":
            return call("GET", "/v1/admin/users")
        path = f"/v1/admin/users/{quote(args.name)}"
        if args.verb == "delete":
            return call("DELETE", path)
        if args.verb == "rotate-token":
            return call("POST", f"{path}/token")
        if args.verb == "rotate-keypair":
            return call("POST", f"{path}/keypair")
        if args.verb == "set-policy":
            return call("PATCH", path, {"policy": None if args.policy == "none" else args.policy})
        return call("PATCH", path, {"disabled": args.verb == "disable"})
    if args.what == "policies":
        if args.verb == "list":
            return call("GET", "/v1/admin/policies")
        path = f"/v1/admin/policies/{quote(args.name)}"
        if args.verb == "delete":
            return call("DELETE", path)
        images = [i.strip() for i in args.allowed_images.split(",") if i.strip()]
        return call(
            "PUT",
            path,
            {
                "max_sessions": args.max_sessions,
                "max_session_resources": args.max_session_resources,
                "total_resources": args.total_resources,
                "allowed_images": images,
                "max_vfolders": args.max_vfolders,
                "max_quota_bytes": args.max_quota,
            },
        )
    if args.verb == "list":
        return call("GET", "/v1/agents")
    if args.verb == "reset":
        return call("DELETE", f"/v1/agents/{quote(args.id)}/key")
    return call("POST", f"/v1/agents/{quote(args.id)}/{args.verb}")


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    path = default_path()
    cfg = ClientConfig.load(path)
    if cfg is None:
        print(f"No client config at {path}: start the gateway with `backendai-jupyter up`.", file=sys.stderr)
        return 1
    from .provisioner.client import GatewayClient

    client = GatewayClient.instance(cfg)

    def call(method: str, p: str, body: Any = None) -> Any:
        return client.submit(client.request(method, p, body, timeout=30)).result()

    try:
        result = run(args, call)
    except ApiError as e:
        print(e.title, file=sys.stderr)
        return 1
    if args.json or result is None:
        print(json.dumps(result, indent=2) if result is not None else "done")
    else:
        print(_human(args, result))
    return 0


def _human(args: argparse.Namespace, result: dict[str, Any]) -> str:
    if "users" in result:
        return "\n".join(
            f"{u['name']:<20} {'admin' if u['is_admin'] else 'user':<6} "
            f"{'disabled' if u['disabled'] else 'active':<9} policy {u['policy'] or '-'}"
            for u in result["users"]
        )
    if "policies" in result:
        return "\n".join(json.dumps(p) for p in result["policies"])
    if "agents" in result:
        lines = []
        for a in result["agents"]:
            drained = "" if a["schedulable"] else "  DRAINED"
            lines.append(f"{a['id']:<20} {a['status']:<8} kernels {a['kernels']}{drained}")
            for d in a["devices"]:
                lines.append(
                    f"    {d['plugin']} {d['id']:<4} {d['label']:<28} {d['uuid']}  held by {d['held_by']}"
                )
        return "\n".join(lines)
    if "token" in result and "secret_key" not in result:
        return f"new token for {result['name']}: {result['token']}"
    if "secret_key" in result and "token" not in result:
        return "\n".join(
            [
                f"new keypair for {result['name']}",
                f"access key: {result['access_key']}",
                f"secret key: {result['secret_key']}",
            ]
        )
    if "secret_key" in result:
        return "\n".join(
            [
                f"created user {result['name']}",
                f"access key: {result['access_key']}",
                f"secret key: {result['secret_key']}",
                f"token:      {result['token']}",
            ]
        )
    return json.dumps(result)
