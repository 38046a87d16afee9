"""The `llmproxy` command (see the package docstring): dispatches to each tool's own `main`,
passing the rest of the command line to it unchanged, so every option and `--help` is the
tool's own. The tools are imported only when chosen (the chat needs none of the server)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import llmproxy_cli


@dataclass(frozen=True)
class Command:
    module: str  # the module whose main(argv) runs it
    summary: str


COMMANDS = {
    "serve": Command("server.main", "run the gRPC server (python -m server.main)"),
    "bridge": Command("bridge.main", "run the WebSocket bridge (python -m bridge.main)"),
    "keys": Command("server.auth.cli", "create, list and revoke API keys (python -m server.auth.cli)"),
    "stats": Command("server.analytics.cli", "the request log's aggregates as a table (python -m server.analytics.cli)"),
    "cluster": Command("llmproxy_cli.cluster", "Redis, a server and a bridge per core on one machine (make cluster, docs/deploy.md)"),
    "chat": Command("llmproxy_client.chat", "a terminal client: streams answers with per-token timing; Ctrl-C stops one"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {c.summary}" for name, c in COMMANDS.items()]
    return "usage: llmproxy COMMAND [options]\n\ncommands:\n" + "\n".join(lines) + "\n\n" + (llmproxy_cli.__doc__ or "").strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        sys.stderr.write(f"llmproxy: unknown command {args[0]!r}\n\n" + usage())
        return 2
    entry: Callable[..., int | None] = importlib.import_module(command.module).main
    if command.module == "llmproxy_client.chat":
        return entry(args[1:], prog="llmproxy chat") or 0
    return entry(args[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
