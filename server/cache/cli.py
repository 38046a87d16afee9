"""`python -m server.cache.cli delete|stats --db PATH ...`: the response cache's file store.

`delete` removes a tenant's entries: `--client KEY_ID` (the id `python -m server.auth.cli list`
shows) or `--open` (the open loopback proxy's tenant), optionally of one `--model`. A running
server then misses on them (its in-process vector index drops a vanished entry when it meets it).
A client key can delete its own entries itself with the `DeleteCache` RPC.
"""

from __future__ import annotations

import argparse
import sys

from server.cache.store import SqliteStore


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.cache.cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    delete = sub.add_parser("delete", help="delete a tenant's entries")
    delete.add_argument("--db", required=True, help="the cache's SQLite file (config: cache.path)")
    who = delete.add_mutually_exclusive_group(required=True)
    who.add_argument("--client", help="the API key id whose entries go")
    who.add_argument("--open", action="store_true", help="the entries of the open loopback proxy (no keys)")
    delete.add_argument("--model", default="", help="only this public model's entries")
    stats = sub.add_parser("stats", help="entries and bytes")
    stats.add_argument("--db", required=True)
    args = parser.parse_args(argv)
    store = SqliteStore(args.db)
    try:
        if args.command == "delete":
            deleted = store.delete("" if args.open else args.client, args.model)
            print(f"deleted {deleted} entries")
        else:
            s = store.stats()
            print(f"entries {s.entries}  bytes {s.bytes}")
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
