"""Secrets from files (the relay token): shared by the bridge and the server, which imports it;
the bridge imports nothing from the server."""

from __future__ import annotations


def read_secret(path: str, prog: str = "llmproxy") -> str:
    """The first line of a secret file, stripped. Raises SystemExit with a clear message when the
    file cannot be read or holds fewer than 16 characters."""
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.readline().strip()
    except OSError as exc:
        raise SystemExit(f"{prog}: cannot read {path}: {exc.strerror}") from None
    if len(secret) < 16:
        raise SystemExit(f"{prog}: {path} must hold a secret of at least 16 characters")
    return secret
