"""`python -m server.auth.cli create|list|revoke --db PATH ...`: manage API keys.

`create` prints the new key once; only its salted hash is stored, so a lost key cannot be
recovered (revoke it and create another). `list` shows ids, names and limits, never secrets.
"""

from __future__ import annotations

import argparse
import sys
import time

from server.auth.limits import KeyLimits
from server.auth.store import KeyStore


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.auth.cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a key and print it once")
    create.add_argument("--db", required=True)
    create.add_argument("--name", default="")
    create.add_argument("--models", default="", help="comma-separated allowed models; empty: all")
    create.add_argument("--rpm", type=int, default=0, help="stream starts per minute; 0: no limit")
    create.add_argument("--tpm", type=int, default=0, help="completion tokens per minute; 0: no limit")
    create.add_argument("--concurrency", type=int, default=0, help="live streams at once; 0: no limit")
    create.add_argument("--connections", type=int, default=0, help="open connections at once; 0: no limit")
    create.add_argument("--budget-tokens", type=int, default=0, help="completion tokens per period; 0: no limit")
    create.add_argument("--budget-period-s", type=int, default=86_400)
    create.add_argument("--admin", action="store_true", help="may read every key's statistics (others see only their own)")
    listing = sub.add_parser("list", help="list keys (ids and limits, no secrets)")
    listing.add_argument("--db", required=True)
    revoke = sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("--db", required=True)
    revoke.add_argument("key_id")
    revoke.add_argument(
        "--cancel-streams", action="store_true", help="also end the key's running streams (every server, within 1 s)"
    )
    revoke.add_argument(
        "--store",
        default="",
        help="also write the revocation to this redis:// store, for servers whose key files lack it (docs/cluster-limits.md)",
    )
    args = parser.parse_args(argv)
    store = KeyStore(args.db)
    try:
        if args.command == "create":
            numbers = (args.rpm, args.tpm, args.concurrency, args.connections, args.budget_tokens)
            if min(numbers) < 0 or args.budget_period_s < 1:
                parser.error("limits must be >= 0 and --budget-period-s >= 1")
            limits = KeyLimits(
                models=frozenset(m.strip() for m in args.models.split(",") if m.strip()),
                rpm=args.rpm,
                tpm=args.tpm,
                concurrency=args.concurrency,
                connections=args.connections,
                budget_tokens=args.budget_tokens,
                budget_period_s=args.budget_period_s,
            )
            key, record = store.create(args.name, limits, admin=args.admin)
            print(key)
            print(f"created key {record.key_id}; it is shown only this once", file=sys.stderr)
        elif args.command == "list":
            for r in store.list():
                l = r.limits
                created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.created_at))
                print(
                    f"{r.key_id}  {'revoked' if r.revoked else 'active '}  {created}  name={r.name!r}{' admin' if r.admin else ''}"
                    f" models={','.join(sorted(l.models)) or '*'} rpm={l.rpm} tpm={l.tpm} concurrency={l.concurrency}"
                    f" connections={l.connections} budget={l.budget_tokens}/{l.budget_period_s}s"
                )
        else:
            changed = store.revoke(args.key_id, args.cancel_streams)
            if args.store:  # shared: written even when this file had it already
                from server.auth.cluster import revoke_in_redis

                if args.key_id not in store.revocations():
                    print(f"no key {args.key_id!r} in {args.db}", file=sys.stderr)
                    return 1
                import redis

                try:
                    revoke_in_redis(args.store, args.key_id, args.cancel_streams)
                except redis.RedisError as exc:
                    print(f"revoked in {args.db}, but the store did not take it ({type(exc).__name__}); the servers"
                          " reading this file still refuse the key", file=sys.stderr)
                    return 2
            elif not changed:
                print(f"no active key {args.key_id!r}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}" + (" and cancelled its streams" if args.cancel_streams else ""))
            if not args.cancel_streams:
                print(
                    "its open connections can start no new stream within 1 s; its running streams go on"
                    " (revoke again with --cancel-streams to end them)",
                    file=sys.stderr,
                )
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
