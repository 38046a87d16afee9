"""Cache keys: a hash of everything that determines an answer, and nothing else. Pure.

The exact key covers the public model, the upstream models of its deployments (so a config change
that points the name at another model misses), the whole message list (system prompt included),
tools, tool choice, every generation parameter, and the tenant: the client key id, or "" on an
open loopback proxy. Two tenants never share a key.

The semantic scope is the same hash with the text of the last user message left out: a semantic
lookup compares that text only among entries of the same scope, so a paraphrase can hit but a
different system prompt, earlier turn, parameter, tool or tenant cannot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence

from server.core.request import ChatRequest


def _digest(kind: str, request: ChatRequest, upstream_models: Sequence[str], tenant: str) -> str:
    fields = dataclasses.asdict(request)
    for message in fields["messages"]:  # a prompt-cache breakpoint changes the bill, not the answer
        del message["cache_breakpoint"]
    body = {
        "kind": kind,
        "tenant": tenant,
        "upstream": sorted(upstream_models),
        "request": fields,
    }
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def exact_key(request: ChatRequest, upstream_models: Sequence[str], tenant: str) -> str:
    return _digest("exact", request, upstream_models, tenant)


def prompt_text(request: ChatRequest) -> str:
    """The text a semantic lookup compares: the last user message ("" when the last message is
    not the user's: then there is no semantic lookup)."""
    if request.messages and request.messages[-1].role == "user":
        return request.messages[-1].content
    return ""


def semantic_scope(request: ChatRequest, upstream_models: Sequence[str], tenant: str) -> str:
    last = request.messages[-1]
    blanked = dataclasses.replace(request, messages=(*request.messages[:-1], dataclasses.replace(last, content="")))
    return _digest("semantic", blanked, upstream_models, tenant)
