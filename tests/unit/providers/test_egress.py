"""server/providers/egress.py: which upstream goes through which proxy, from the environment."""

from __future__ import annotations

import base64

import pytest

from server.config import ConfigError, ServerConfig, build_catalog
from server.providers.egress import EgressProxies, ProxyConfigError, ProxyEndpoint


def test_no_variables_no_proxy():
    assert EgressProxies.from_env({}).proxy_for("https", "api.openai.com", 443) is None


def test_https_and_http_each_have_their_own_variable():
    proxies = EgressProxies.from_env({"HTTPS_PROXY": "http://egress:3128", "HTTP_PROXY": "plain:8080"})
    assert proxies.proxy_for("https", "api.openai.com", 443) == ProxyEndpoint("egress", 3128)
    assert proxies.proxy_for("http", "llm.internal", 80) == ProxyEndpoint("plain", 8080)  # no scheme: http://
    only_https = EgressProxies.from_env({"HTTPS_PROXY": "http://egress:3128"})
    assert only_https.proxy_for("http", "llm.internal", 80) is None


def test_the_lowercase_variable_wins():
    proxies = EgressProxies.from_env({"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"})
    assert proxies.proxy_for("https", "a.example", 443) == ProxyEndpoint("lower", 1)


def test_credentials_become_basic_proxy_authorization_and_stay_out_of_repr():
    proxies = EgressProxies.from_env({"HTTPS_PROXY": "http://us%40er:p%3Ass@egress:3128"})
    proxy = proxies.proxy_for("https", "a.example", 443)
    assert proxy is not None and proxy.url == "http://egress:3128"
    assert proxy.authorization == "Basic " + base64.b64encode(b"us@er:p:ss").decode()
    assert "p:ss" not in repr(proxy) and "p%3Ass" not in repr(proxies)


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypassed"),
    [
        ("example.com", "example.com", 443, True),
        ("example.com", "api.example.com", 443, True),
        (".example.com", "api.example.com", 443, True),
        (".example.com", "example.com", 443, True),
        ("*.example.com", "api.example.com", 443, True),
        ("example.com", "notexample.com", 443, False),
        ("example.com", "example.com.evil.net", 443, False),
        ("EXAMPLE.com", "api.Example.COM", 443, True),
        ("10.0.0.0/8", "10.1.2.3", 443, True),
        ("10.0.0.0/8", "11.1.2.3", 443, False),
        ("192.168.1.5", "192.168.1.5", 443, True),
        ("fd00::/8", "fd00::1", 443, True),
        ("[fd00::1]:8443", "fd00::1", 8443, True),
        ("[fd00::1]:8443", "fd00::1", 443, False),
        ("example.com:8443", "api.example.com", 8443, True),
        ("example.com:8443", "api.example.com", 443, False),
        ("a.net, b.net c.net", "x.c.net", 443, True),
        ("*", "anything.example", 443, True),
        ("", "example.com", 443, False),
    ],
)
def test_no_proxy(no_proxy, host, port, bypassed):
    proxies = EgressProxies.from_env({"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": no_proxy})
    assert (proxies.proxy_for("https", host, port) is None) is bypassed


@pytest.mark.parametrize("host", ["localhost", "api.localhost", "127.0.0.1", "127.9.9.9", "::1", "[::1]"])
def test_a_loopback_upstream_never_goes_through_a_proxy(host):
    assert EgressProxies.from_env({"HTTP_PROXY": "http://egress:3128"}).proxy_for("http", host, 8000) is None


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("https://egress:3128", "only http:// proxies"),
        ("socks5://egress:1080", "only http:// proxies"),
        ("http://egress:notaport", "invalid port"),
        ("http://:3128", "no host"),
    ],
)
def test_a_proxy_we_cannot_use_is_refused(value, problem):
    with pytest.raises(ProxyConfigError, match=problem) as info:
        EgressProxies.from_env({"HTTPS_PROXY": value})
    assert "HTTPS_PROXY" in str(info.value)


def test_the_server_reads_the_proxy_from_its_environment_at_start():
    with pytest.raises(ConfigError, match="the environment: HTTPS_PROXY: only http:// proxies are supported"):
        build_catalog(ServerConfig(), environ={"HTTPS_PROXY": "socks5://egress:1080"})
