"""The store: where state that several server processes share lives (docs/deploy.md).

`memory` (the default, `make run`): every session, limit and counter lives in this process,
exactly as one server always kept them. `redis://...` (`--store`): sessions, each stream's
frames (a Redis Stream per stream), stream ownership, per-key counters, revocations and the
live statistics of every server live in Redis, so any server can serve any client and take
over the streams of a server that died. The sans-I/O core never sees the store: drivers around
it (server/store/*.py, server/service.py) read and write it.
"""

from server.store.base import Store, open_store

__all__ = ["Store", "open_store"]
