"""Builds the response cache from the config file's `cache:` section (docs/caching.md).

    cache:
      path: cache.sqlite3        # default: in memory
      ttl_s: 3600
      max_entries: 10000
      max_bytes: 67108864
      pace: recorded             # or instant
      default: {exact: true, semantic: false, threshold: 0.9, tool_calls: false, max_temperature: 1.0}
      models:
        gpt-4o-mini: {semantic: true}
      embeddings:                # for semantic caching; default: the local model
        provider: local          # local | openai | gemini
        model: text-embedding-3-small
        base_url: https://api.openai.com/v1
        key: env:OPENAI_API_KEY

No `cache:` section: no response cache.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from server.cache.cache import CacheSettings, ModelPolicy, Pace, ResponseCache
from server.cache.embeddings import Embedder, build_embedder
from server.cache.store import SqliteStore
from server.catalog import Catalog
from server.config import ConfigError

_KEYS = frozenset({"path", "ttl_s", "max_entries", "max_bytes", "pace", "default", "models", "embeddings"})
_POLICY_KEYS = frozenset({"exact", "semantic", "threshold", "tool_calls", "max_temperature"})


def _mapping(value: object, where: str, allowed: frozenset[str] | None) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping")
    if allowed is not None:
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    return value


def _number(section: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{where}.{key} must be a number >= 0")
    return float(value)


def _policy(value: object, base: ModelPolicy, where: str) -> ModelPolicy:
    section = _mapping(value, where, _POLICY_KEYS)
    for flag in ("exact", "semantic", "tool_calls"):
        if flag in section and not isinstance(section[flag], bool):
            raise ConfigError(f"{where}.{flag} must be true or false")
    threshold = _number(section, "threshold", base.threshold, where)
    if not 0 < threshold <= 1:
        raise ConfigError(f"{where}.threshold must be in (0, 1]")
    return ModelPolicy(
        exact=section.get("exact", base.exact),
        semantic=section.get("semantic", base.semantic),
        threshold=threshold,
        tool_calls=section.get("tool_calls", base.tool_calls),
        max_temperature=_number(section, "max_temperature", base.max_temperature, where),
    )


def parse_settings(section: object, where: str = "cache") -> tuple[CacheSettings, Mapping[str, Any]]:
    """The settings and the raw `embeddings` mapping. Raises `ConfigError`."""
    top = _mapping(section, where, _KEYS)
    base = CacheSettings()
    pace = top.get("pace", base.pace.value)
    if pace not in {p.value for p in Pace}:
        raise ConfigError(f"{where}.pace must be recorded or instant")
    default = _policy(top.get("default"), base.default, f"{where}.default")
    models = {str(name): _policy(v, default, f"{where}.models.{name}") for name, v in _mapping(top.get("models"), f"{where}.models", None).items()}
    settings = CacheSettings(
        path=str(top.get("path", base.path)),
        ttl_s=_number(top, "ttl_s", base.ttl_s, where),
        max_entries=int(_number(top, "max_entries", base.max_entries, where)),
        max_bytes=int(_number(top, "max_bytes", base.max_bytes, where)),
        pace=Pace(pace),
        default=default,
        models=models,
    )
    return settings, _mapping(top.get("embeddings"), f"{where}.embeddings", None)


def build_cache(config_path: str | None, catalog: Catalog, environ: Mapping[str, str] | None = None) -> ResponseCache | None:
    """The response cache the config file asks for, or None. Raises `ConfigError`."""
    if not config_path:
        return None
    try:
        root = yaml.safe_load(Path(config_path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    if not isinstance(root, dict) or "cache" not in root:
        return None
    settings, embeddings = parse_settings(root["cache"], f"{config_path}: cache")
    semantic = settings.default.semantic or any(p.semantic for p in settings.models.values())
    embedder: Embedder | None = None
    if semantic:
        embedder = build_embedder(embeddings, os.environ if environ is None else environ, f"{config_path}: cache.embeddings")
    store = SqliteStore(settings.path, settings.max_entries, settings.max_bytes)
    return ResponseCache(settings, store, catalog, embedder)
