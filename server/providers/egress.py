"""Egress proxies from the environment: `HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY` (no I/O).

Theory of operation. `EgressProxies.from_env(env)` reads the variables once at start-up (the
server's environment is passed in; nothing here reads `os.environ`), and `proxy_for(scheme,
host, port)` says which proxy, if any, carries requests to one upstream origin. Every transport
uses it: the native client opens a CONNECT tunnel for https:// (RFC 9110 9.3.6) and sends
absolute-form requests for http:// (RFC 9112 3.2.2); aiohttp and httpx are handed the proxy URL.

The conventions are curl's and Go's (net/http `ProxyFromEnvironment`), which most tools share:

- the lowercase variable wins over the uppercase one (`https_proxy` before `HTTPS_PROXY`);
- `HTTPS_PROXY` is for https:// upstreams and `HTTP_PROXY` for http:// ones; no `ALL_PROXY`;
- a proxy URL without a scheme is `http://`; only http:// proxies are supported (a TLS
  connection to the proxy itself, or SOCKS, is a `ProxyConfigError` at start-up);
  `user:password@` in it becomes a `Proxy-Authorization: Basic` header;
- `NO_PROXY` is a comma- (or space-) separated list: `*` (no proxy at all), a host name that
  matches itself and its subdomains (`example.com`, `.example.com`), an IP address, a CIDR block
  (`10.0.0.0/8`), each optionally with `:port`;
- as in Go, a loopback upstream (`localhost`, 127.0.0.0/8, ::1) never goes through a proxy: the
  local model server of a developer's machine is not behind the corporate egress.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


class ProxyConfigError(Exception):
    """A proxy variable holds something we cannot use; the message names the variable."""


@dataclass(frozen=True, slots=True)
class ProxyEndpoint:
    """One http:// proxy: where to connect, and the Proxy-Authorization value ("" for none)."""

    host: str
    port: int
    authorization: str = ""

    @property
    def url(self) -> str:
        """The proxy's URL without credentials (for logs and for the library transports)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __repr__(self) -> str:  # never the credentials
        return f"ProxyEndpoint({self.url!r}, auth={'yes' if self.authorization else 'no'})"


@dataclass(frozen=True, slots=True)
class _Bypass:
    """One NO_PROXY entry."""

    domain: str = ""  # matches itself and its subdomains
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None

    def matches(self, host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return ip is not None and ip.version == self.network.version and ip in self.network
        return host == self.domain or host.endswith("." + self.domain)


@dataclass(frozen=True, slots=True)
class EgressProxies:
    """The proxies of the server's environment; the default is none."""

    https: ProxyEndpoint | None = None
    http: ProxyEndpoint | None = None
    bypass: tuple[_Bypass, ...] = ()
    bypass_all: bool = False

    @staticmethod
    def from_env(env: Mapping[str, str]) -> EgressProxies:
        """Raises `ProxyConfigError` for a proxy URL we cannot use."""

        def get(name: str) -> tuple[str, str]:
            for variable in (name.lower(), name.upper()):
                value = env.get(variable, "").strip()
                if value:
                    return variable, value
            return name, ""

        https = _endpoint(*get("https_proxy"))
        http = _endpoint(*get("http_proxy"))
        _, no_proxy = get("no_proxy")
        entries = [e for e in no_proxy.replace(" ", ",").split(",") if e]
        if "*" in entries:
            return EgressProxies(https, http, (), True)
        return EgressProxies(https, http, tuple(_bypass(e) for e in entries))

    def proxy_for(self, scheme: str, host: str, port: int) -> ProxyEndpoint | None:
        """The proxy for requests to `scheme://host:port`, or None to connect directly."""
        proxy = self.https if scheme == "https" else self.http if scheme == "http" else None
        if proxy is None or self.bypass_all:
            return None
        host = host.strip("[]").rstrip(".").lower()
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if host == "localhost" or host.endswith(".localhost") or (ip is not None and ip.is_loopback):
            return None
        if any(entry.matches(host, ip, port) for entry in self.bypass):
            return None
        return proxy


def _endpoint(variable: str, value: str) -> ProxyEndpoint | None:
    if not value:
        return None
    url = urlsplit(value if "://" in value else "http://" + value)
    if url.scheme.lower() != "http":
        raise ProxyConfigError(f"{variable}: only http:// proxies are supported, not {url.scheme}://")
    try:
        port = url.port or 80
    except ValueError:
        raise ProxyConfigError(f"{variable}: the proxy URL has an invalid port") from None
    if not url.hostname:
        raise ProxyConfigError(f"{variable}: the proxy URL has no host")
    authorization = ""
    if url.username is not None:
        credentials = f"{unquote(url.username)}:{unquote(url.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(credentials).decode("ascii")
    return ProxyEndpoint(url.hostname, port, authorization)


def _bypass(entry: str) -> _Bypass:
    entry = entry.strip().lower()
    port: int | None = None
    if entry.startswith("["):  # [v6]:port
        address, _, rest = entry[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
        entry = address
    elif entry.count(":") == 1:
        name, _, digits = entry.partition(":")
        if digits.isdigit():
            entry, port = name, int(digits)
    try:
        return _Bypass(network=ipaddress.ip_network(entry, strict=False), port=port)
    except ValueError:
        return _Bypass(domain=entry.lstrip("*").lstrip(".").rstrip("."), port=port)
