"""Server configuration: command-line settings and the deployment catalog they describe.

The built-in `demo` provider serves models `demo` (paced like a real model) and `demo-fast`
(unpaced, for benchmarks) unless `--demo off`; with API keys, only keys whose model list names
them may use them, unless `--demo all-keys` (docs/security.md). Further models come from two
places:

- the YAML file given with `--config` (documented in docs/configuration.md, example in
  config.example.yaml), which maps public model names to one or more deployments;
- the well-known models of each provider whose key is in the environment (`OPENAI_API_KEY`,
  `ANTHROPIC_API_KEY`, `GEMINI_API_KEY`), when there is no config file or it sets
  `well_known: true`.

The egress proxy comes from the environment too (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`; see
server/providers/egress.py). Keys are read once here, from `env:NAME` or `file:/path` references, into `Secret`s. Base URLs
come from this file only: no client field reaches them. A mistake in the file stops the start
with a `ConfigError` naming the file, the line and the problem.
"""

from __future__ import annotations

import enum
import importlib.util
import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from server.core.session import SessionLimits
from server.providers.adapter import Endpoint, Secret, Timeouts
from server.providers.base import Backend, DeploymentInfo
from server.providers.demo import DemoBackend, DemoPace, load_corpus
from server.providers.egress import EgressProxies, ProxyConfigError
from server.providers.http import ClientPool, HttpSettings, TransportName
from server.providers.registry import BuildContext, Provider, providers
from server.routing.policy import (
    AfterFirstToken,
    BreakerPolicy,
    BudgetPolicy,
    ModelRoute,
    RetryPolicy,
    RoutingCatalog,
    Strategy,
)

BUILTIN_MODELS = ("demo", "demo-fast")
DEMO_MODES = ("on", "off", "all-keys")  # served (keys must name them) / not served / any key

log = logging.getLogger("llmproxy.config")

_E = TypeVar("_E", bound=enum.Enum)

# A deployment's extra request headers: an RFC 9110 token as the name, one line of text as the value.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\xa0-\xff]*")


class ConfigError(Exception):
    """The config file is wrong; the message names the file, the line and the problem."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    demo_pace: DemoPace = field(default_factory=DemoPace)
    limits: SessionLimits = field(default_factory=SessionLimits)
    shutdown_grace_s: float = 5.0
    config_path: str | None = None
    demo: str = "on"  # one of DEMO_MODES

    def keys_must_name(self) -> frozenset[str]:
        """Models an API key may use only when its model list names them."""
        return frozenset(BUILTIN_MODELS) if self.demo == "on" else frozenset()


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """One deployment of one public model, as the config file (or the environment) says."""

    model: str  # the public name
    info: DeploymentInfo
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """The parsed config file."""

    deployments: tuple[DeploymentSpec, ...] = ()
    http: HttpSettings = field(default_factory=HttpSettings)
    well_known: bool = True
    routes: Mapping[str, ModelRoute] = field(default_factory=dict)  # per public model
    default_route: ModelRoute = field(default_factory=ModelRoute)  # the `routing:` section
    budget: BudgetPolicy = field(default_factory=BudgetPolicy)


def build_catalog(config: ServerConfig, environ: Mapping[str, str] | None = None) -> RoutingCatalog:
    """Every model this server serves, with its routing. Raises `ConfigError`. Builds the
    shared connection pool; `Catalog.aclose()` closes it."""
    env = os.environ if environ is None else environ
    registry = providers()
    proxy = load_config(config.config_path, registry, env) if config.config_path else ProxyConfig()
    corpus = load_corpus()
    models: dict[str, list[Backend]] = {}
    if config.demo != "off":
        models["demo"] = [DemoBackend(DeploymentInfo("demo", "demo", "demo-corpus"), config.demo_pace, corpus)]
        models["demo-fast"] = [
            DemoBackend(
                DeploymentInfo("demo-fast", "demo", "demo-corpus"),
                DemoPace(ttft_s=0.0, tokens_per_s=0.0, jitter=0.0, seed=config.demo_pace.seed, max_tokens=config.demo_pace.max_tokens),
                corpus,
            )
        ]
    try:
        proxies = EgressProxies.from_env(env)  # HTTPS_PROXY, HTTP_PROXY, NO_PROXY
    except ProxyConfigError as exc:
        raise ConfigError(f"the environment: {exc}") from None
    ctx = BuildContext(ClientPool(replace(proxy.http, proxies=proxies)), config.demo_pace, corpus)
    specs = list(proxy.deployments)
    if proxy.well_known:
        configured = {spec.model for spec in specs}
        specs += [s for s in well_known_deployments(registry, env) if s.model not in configured]
    for spec in specs:
        if spec.endpoint.key is not None and (host := plain_http_host(spec.endpoint.base_url)):
            # RFC 9110 4.2.1: http:// is readable by every hop on the way; a key is a bill.
            log.warning(
                "deployment %s sends its provider key over plain http:// to %s, a host that is not loopback: "
                "anyone on the path can read it; use https://",
                spec.info.name,
                host,
            )
        backend = registry[spec.info.provider].build(spec.info, spec.endpoint, ctx)
        models.setdefault(spec.model, []).append(backend)
    for public, route in proxy.routes.items():
        for fallback in route.fallbacks:
            if fallback not in models:
                raise ConfigError(f"{config.config_path}: model {public!r} falls back to {fallback!r}, which is not served")
    return RoutingCatalog(models, proxy.routes, proxy.budget, proxy.default_route)


def plain_http_host(base_url: str) -> str:
    """The host of an `http://` URL whose host is not loopback (localhost, 127.0.0.0/8, ::1), or
    "" (https://, or loopback, where nothing leaves the machine)."""
    parts = urlsplit(base_url)
    if parts.scheme.lower() != "http":
        return ""
    host = (parts.hostname or "").rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761 6.3
        return ""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return ""
    except ValueError:
        pass  # a name
    return host


def well_known_deployments(registry: Mapping[str, Provider], env: Mapping[str, str]) -> list[DeploymentSpec]:
    """The well-known models of each provider whose key variable is set and not empty."""
    specs = []
    for name, provider in registry.items():
        key = env.get(provider.key_env, "") if provider.key_env else ""
        if not key:
            continue
        for model in provider.well_known:
            info = DeploymentInfo(f"{name}:{model}", name, model)
            specs.append(DeploymentSpec(model, info, Endpoint(name, model, provider.default_base_url, Secret(key))))
    return specs


# -- the YAML file -------------------------------------------------------------------------------

_TOP_KEYS = frozenset({"models", "http", "defaults", "well_known", "routing", "cache"})  # cache: server/cache/setup.py
_ROUTE_KEYS = frozenset({"strategy", "fallbacks", "after_first_token", "retry", "breaker"})
_RETRY_KEYS = frozenset({"max_attempts", "backoff_base_s", "backoff_max_s", "deadline_s"})
_BREAKER_KEYS = frozenset({"failures", "error_rate", "window_s", "min_requests", "cooldown_s", "half_open_probes"})
_BUDGET_KEYS = frozenset({"percent", "min_concurrent"})
_DEPLOYMENT_KEYS = frozenset(
    {"provider", "model", "name", "base_url", "key", "weight", "timeouts", "headers", "api_version", "prompt_cache"}
)
_TIMEOUT_KEYS = frozenset({"connect_s", "first_token_s", "stall_s"})


def load_config(path: str, registry: Mapping[str, Provider], env: Mapping[str, str]) -> ProxyConfig:
    """Parses the config file at `path`; raises `ConfigError`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    return _Parser(path, registry, env).parse(text)


class _Parser:
    """Walks the YAML node tree so every error can name its line (yaml node marks)."""

    def __init__(self, path: str, registry: Mapping[str, Provider], env: Mapping[str, str]) -> None:
        self._path = path
        self._registry = registry
        self._env = env
        self._loader = yaml.SafeLoader("")

    def error(self, node: yaml.Node | None, problem: str) -> ConfigError:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return ConfigError(f"{self._path}{line}: {problem}")

    def parse(self, text: str) -> ProxyConfig:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{self._path}{where}: invalid YAML: {exc.problem or exc.context}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self._path}: invalid YAML: {exc}") from None
        if root is None:
            return ProxyConfig(well_known=False)
        top = self.mapping(root, "the config file", _TOP_KEYS)
        http = self.http(top["http"]) if "http" in top else HttpSettings()
        timeouts = Timeouts()
        if "defaults" in top:
            defaults = self.mapping(top["defaults"], "defaults", frozenset({"timeouts"}))
            if "timeouts" in defaults:
                timeouts = self.timeouts(defaults["timeouts"], timeouts)
        well_known = self.boolean(top["well_known"]) if "well_known" in top else False
        default_route, budget = ModelRoute(), BudgetPolicy()
        if "routing" in top:
            routing = self.mapping(top["routing"], "routing", (_ROUTE_KEYS - {"fallbacks"}) | {"budget"})
            default_route = self.route(routing, default_route)
            if "budget" in routing:
                budget = self.budget(routing["budget"])
        deployments: list[DeploymentSpec] = []
        routes: dict[str, ModelRoute] = {}
        fallback_nodes: list[tuple[str, yaml.Node]] = []
        if "models" in top:
            models_node = top["models"]
            for public, node in self.mapping(models_node, "models", None).items():
                if public in BUILTIN_MODELS:
                    raise self.error(node, f"model {public!r} is built in and cannot be configured")
                items: list[yaml.Node] = node.value if isinstance(node, yaml.SequenceNode) else [node]
                if isinstance(node, yaml.MappingNode):
                    # Routing keys sit beside one deployment's keys, or beside `deployments:`.
                    route_pairs = [(k, v) for k, v in node.value if self.string(k) in _ROUTE_KEYS]
                    rest = [(k, v) for k, v in node.value if self.string(k) not in _ROUTE_KEYS]
                    route_fields = self.mapping(yaml.MappingNode(node.tag, route_pairs, node.start_mark), "routing", None)
                    routes[public] = self.route(route_fields, default_route)
                    if "fallbacks" in route_fields:
                        fallback_nodes.append((public, route_fields["fallbacks"]))
                    rest_node = yaml.MappingNode(node.tag, rest, node.start_mark)
                    if any(self.string(k) == "deployments" for k, _ in rest):
                        fields = self.mapping(rest_node, f"model {public!r}", frozenset({"deployments"}))
                        listed = fields["deployments"]
                        if not isinstance(listed, yaml.SequenceNode):
                            raise self.error(listed, "deployments must be a list")
                        items = listed.value
                    else:
                        items = [rest_node]
                if not items:
                    raise self.error(node, f"model {public!r} has no deployments")
                for i, item in enumerate(items):
                    deployments.append(self.deployment(public, i, item, timeouts))
        configured = {d.model for d in deployments}
        for public, node in fallback_nodes:
            for fallback in routes[public].fallbacks:
                if fallback == public:
                    raise self.error(node, f"model {public!r} cannot fall back to itself")
                if fallback not in configured and fallback not in BUILTIN_MODELS and not well_known:
                    raise self.error(node, f"model {public!r} falls back to {fallback!r}, which is not configured")
        return ProxyConfig(tuple(deployments), http, well_known, routes, default_route, budget)

    def route(self, fields: dict[str, yaml.Node], base: ModelRoute) -> ModelRoute:
        strategy, after = base.strategy, base.after_first_token
        if "strategy" in fields:
            strategy = self.choice(fields["strategy"], Strategy)
        if "after_first_token" in fields:
            after = self.choice(fields["after_first_token"], AfterFirstToken)
        fallbacks: tuple[str, ...] = ()
        if "fallbacks" in fields:
            node = fields["fallbacks"]
            if not isinstance(node, yaml.SequenceNode):
                raise self.error(node, "fallbacks must be a list of model names")
            fallbacks = tuple(self.string(item) for item in node.value)
        retry = base.retry
        if "retry" in fields:
            values = self.numbers(fields["retry"], "retry", _RETRY_KEYS)
            if "max_attempts" in values and values["max_attempts"] < 1:
                raise self.error(fields["retry"], "max_attempts must be at least 1")
            retry = RetryPolicy(
                max_attempts=int(values.get("max_attempts", retry.max_attempts)),
                backoff_base_s=values.get("backoff_base_s", retry.backoff_base_s),
                backoff_max_s=values.get("backoff_max_s", retry.backoff_max_s),
                deadline_s=values.get("deadline_s", retry.deadline_s),
            )
        breaker = base.breaker
        if "breaker" in fields:
            values = self.numbers(fields["breaker"], "breaker", _BREAKER_KEYS)
            if not 0 < values.get("error_rate", 0.5) <= 1:
                raise self.error(fields["breaker"], "error_rate must be in (0, 1]")
            breaker = BreakerPolicy(
                failures=int(values.get("failures", breaker.failures)),
                error_rate=values.get("error_rate", breaker.error_rate),
                window_s=values.get("window_s", breaker.window_s),
                min_requests=int(values.get("min_requests", breaker.min_requests)),
                cooldown_s=values.get("cooldown_s", breaker.cooldown_s),
                half_open_probes=int(values.get("half_open_probes", breaker.half_open_probes)),
            )
        return ModelRoute(strategy, fallbacks, after, retry, breaker)

    def budget(self, node: yaml.Node) -> BudgetPolicy:
        values = self.numbers(node, "budget", _BUDGET_KEYS)
        base = BudgetPolicy()
        return BudgetPolicy(
            percent=values.get("percent", base.percent), min_concurrent=int(values.get("min_concurrent", base.min_concurrent))
        )

    def numbers(self, node: yaml.Node, what: str, allowed: frozenset[str]) -> dict[str, float]:
        """A mapping of positive numbers."""
        values = {}
        for name, value_node in self.mapping(node, what, allowed).items():
            value = self.number(value_node)
            if value <= 0:
                raise self.error(value_node, f"{name} must be greater than 0")
            values[name] = value
        return values

    def choice(self, node: yaml.Node, kind: type[_E]) -> _E:
        value = self.string(node)
        for member in kind:
            if member.value == value:
                return member
        raise self.error(node, f"expected one of {', '.join(m.value for m in kind)}, not {value!r}")

    def deployment(self, public: str, index: int, node: yaml.Node, timeouts: Timeouts) -> DeploymentSpec:
        fields = self.mapping(node, f"a deployment of {public!r}", _DEPLOYMENT_KEYS)
        if "provider" not in fields:
            raise self.error(node, f"a deployment of {public!r} needs a provider")
        provider_name = self.string(fields["provider"])
        provider = self._registry.get(provider_name)
        if provider is None:
            known = ", ".join(sorted(self._registry))
            raise self.error(fields["provider"], f"unknown provider {provider_name!r} (known: {known})")
        upstream = self.string(fields["model"]) if "model" in fields else public
        base_url = self.base_url(fields["base_url"]) if "base_url" in fields else provider.default_base_url
        if provider.needs_base_url and not base_url:
            raise self.error(node, f"provider {provider_name!r} needs a base_url")
        key: Secret | None = None
        if "key" in fields:
            key = self.key(fields["key"])
        elif provider.key_env:
            key = self.key_from_env(provider.key_env, node)
        elif provider.needs_key:
            raise self.error(node, f"provider {provider_name!r} needs a key (key: env:NAME or file:/path)")
        weight = self.number(fields["weight"]) if "weight" in fields else 1.0
        if weight <= 0:
            raise self.error(fields["weight"], "weight must be greater than 0")
        if "timeouts" in fields:
            timeouts = self.timeouts(fields["timeouts"], timeouts)
        headers: tuple[tuple[str, str], ...] = ()
        if "headers" in fields:
            headers = tuple(self.header(name, value) for name, value in self.mapping(fields["headers"], "headers", None).items())
        api_version = self.string(fields["api_version"]) if "api_version" in fields else ""
        name = self.string(fields["name"]) if "name" in fields else f"{public}#{index + 1}"
        info = DeploymentInfo(name, provider_name, upstream, weight)
        prompt_cache = False
        if "prompt_cache" in fields:  # `auto`: mark the stable prefix (system, tools, earlier turns)
            mode = self.string(fields["prompt_cache"])
            if mode not in ("auto", "off"):
                raise self.error(fields["prompt_cache"], "prompt_cache must be auto or off")
            prompt_cache = mode == "auto"
        endpoint = Endpoint(provider_name, upstream, base_url, key, headers, timeouts, api_version, prompt_cache)
        return DeploymentSpec(public, info, endpoint)

    # -- typed readers --

    def header(self, name: str, node: yaml.Node) -> tuple[str, str]:
        """One extra request header: an RFC 9110 token for the name, visible latin-1 text for the
        value (what fits on an HTTP/1.1 header line)."""
        value = self.string(node)
        if not _HEADER_NAME.fullmatch(name):
            raise self.error(node, f"header name {name!r} is not a valid HTTP token")
        if not _HEADER_VALUE.fullmatch(value):
            raise self.error(node, f"header {name!r}: the value must be printable latin-1 text on one line")
        return name, value

    def mapping(self, node: yaml.Node, what: str, allowed: frozenset[str] | None) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"{what} must be a mapping")
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self.string(key_node)
            if key in out:
                raise self.error(key_node, f"{key!r} appears twice in {what}")
            if allowed is not None and key not in allowed:
                raise self.error(key_node, f"unknown key {key!r} in {what} (allowed: {', '.join(sorted(allowed))})")
            out[key] = value_node
        return out

    def scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, "expected a single value")
        return self._loader.construct_object(node, deep=True)

    def string(self, node: yaml.Node) -> str:
        value = self.scalar(node)
        if not isinstance(value, str) or not value:
            raise self.error(node, "expected a non-empty string")
        return value

    def number(self, node: yaml.Node) -> float:
        value = self.scalar(node)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(node, "expected a number")
        return float(value)

    def boolean(self, node: yaml.Node) -> bool:
        value = self.scalar(node)
        if not isinstance(value, bool):
            raise self.error(node, "expected true or false")
        return value

    def base_url(self, node: yaml.Node) -> str:
        value = self.string(node)
        if not value.startswith(("http://", "https://")):
            raise self.error(node, "base_url must start with http:// or https://")
        return value.rstrip("/")

    def timeouts(self, node: yaml.Node, base: Timeouts) -> Timeouts:
        fields = self.mapping(node, "timeouts", _TIMEOUT_KEYS)
        values = {}
        for name, value_node in fields.items():
            value = self.number(value_node)
            if value <= 0:
                raise self.error(value_node, f"{name} must be greater than 0")
            values[name] = value
        return Timeouts(
            connect_s=values.get("connect_s", base.connect_s),
            first_token_s=values.get("first_token_s", base.first_token_s),
            stall_s=values.get("stall_s", base.stall_s),
        )

    def http(self, node: yaml.Node) -> HttpSettings:
        fields = self.mapping(node, "http", frozenset({"transport", "http2", "ca_file"}))
        transport = self.string(fields["transport"]) if "transport" in fields else "native"
        if transport not in ("native", "aiohttp", "httpx"):
            raise self.error(fields["transport"], "transport must be native, aiohttp or httpx")
        http2 = self.boolean(fields["http2"]) if "http2" in fields else False
        if http2 and transport != "httpx":
            raise self.error(fields["http2"], "http2 needs transport: httpx")
        # Optional transports are optional dependencies (pyproject's extras): say which at load
        # time, not with an ImportError at the first request.
        if http2 and importlib.util.find_spec("h2") is None:
            raise self.error(fields["http2"], "http2 needs the h2 package: pip install 'llmproxy[http2]'")
        ca_file = self.string(fields["ca_file"]) if "ca_file" in fields else None
        if ca_file is not None:
            if transport == "httpx":
                raise self.error(fields["ca_file"], "ca_file needs transport: native or aiohttp")
            if not Path(ca_file).is_file():
                raise self.error(fields["ca_file"], f"no such CA file: {ca_file}")
        name: TransportName = "native" if transport == "native" else "aiohttp" if transport == "aiohttp" else "httpx"
        return HttpSettings(transport=name, http2=http2, ca_file=ca_file)

    def key(self, node: yaml.Node) -> Secret:
        """A key reference: `env:NAME` or `file:/path` (never the key itself in the file)."""
        ref = self.string(node)
        scheme, _, rest = ref.partition(":")
        if scheme == "env" and rest:
            return self.key_from_env(rest, node)
        if scheme == "file" and rest:
            try:
                with open(rest, encoding="utf-8") as f:
                    value = f.read().strip()
            except OSError as exc:
                raise self.error(node, f"cannot read the key file {rest}: {exc.strerror}") from None
            if not value:
                raise self.error(node, f"the key file {rest} is empty")
            return Secret(value)
        raise self.error(node, "key must be a reference: env:NAME or file:/path")

    def key_from_env(self, name: str, node: yaml.Node) -> Secret:
        value = self._env.get(name, "")
        if not value:
            raise self.error(node, f"the environment variable {name} (the key) is not set")
        return Secret(value)
