"""Entry point: `python -m server.main`. Builds everything in `main()`; no module globals.

Prints one line `llmproxy-server listening on HOST:PORT` once serving (tests read the port from
it when started with port 0). SIGINT/SIGTERM: health goes NOT_SERVING, then the server stops
with a grace period so running streams can finish.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import random
import signal
import sys
from dataclasses import dataclass, replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from bridge.secret_file import read_secret
from bridge.supervisor import Supervisor, run_loop
from server.analytics.cluster import ClusterAnalytics
from server.analytics.live import LiveWindow
from server.analytics.metrics import Metrics
from server.tracing import OtlpHttpExporter, Tracer
from server.analytics.requestlog import RequestLog
from server.analytics.sink import Analytics
from server.auth.cluster import ClusterKeys
from server.auth.policy import AuthPolicy
from server.auth.store import KeyStore
from server.cache.setup import build_cache
from server.config import DEMO_MODES, ConfigError, ServerConfig, build_catalog
from server.core.session import SessionLimits
from server.providers.demo import DemoPace
from server.routing import Router
from server.relay import RelayServicer
from server.service import LLMProxyServicer, ServiceSettings
from server.store.base import RedisStore, open_store

log = logging.getLogger("llmproxy.server")

HANDSHAKE_TIMEOUT_MS = 5_000
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LLMProxy"].full_name
RELAY_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Relay"].full_name


@dataclass(frozen=True, slots=True)
class Options:
    config: ServerConfig
    service: ServiceSettings
    metrics_listen: str = ""  # host:port for Prometheus /metrics; empty: off
    request_log: str = ""  # SQLite path; empty: off
    request_log_retention_s: float = 7 * 86400
    auth_db: str = ""  # SQLite key store (server/auth); empty: no keys, loopback only
    insecure_no_auth: bool = False  # serve beyond loopback without keys (loud warning)
    tls_cert: str = ""  # PEM certificate chain; with tls_key: gRPC over TLS
    tls_key: str = ""
    analytics: bool = True  # metrics, request log, live stats
    relay_token_file: str = ""  # the bridges' shared secret for the Relay RPC; empty: relay off
    min_ping_interval_ms: int = 10_000  # the least gap between a client's keepalive pings
    routing_seed: int | None = None  # seeds the router's choices (tests); None: unseeded
    otlp_endpoint: str = ""  # OTLP/HTTP traces endpoint (server/tracing.py); empty: no tracing
    store: str = "memory"  # memory, or a redis:// URL shared by several servers (server/store/)
    server_id: str = ""  # this process's name in the cluster; empty: host-pid-random
    also_listen: tuple[str, ...] = ()  # more host:port to serve on (make cluster: a port of its own)
    reuse_port: bool = False  # SO_REUSEPORT: several servers share --listen (make cluster)


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="llmproxy-server", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:50051", help="host:port for gRPC (port 0: any free)")
    parser.add_argument("--also-listen", action="append", default=[], help="another host:port to serve on (repeatable)")
    parser.add_argument(
        "--reuse-port", action="store_true", help="SO_REUSEPORT: several servers share --listen and the kernel spreads connections"
    )
    parser.add_argument("--config", default=None, help="deployment config file (YAML)")
    parser.add_argument("--demo-ttft-ms", type=float, default=250.0, help="demo time to first token")
    parser.add_argument("--demo-tokens-per-s", type=float, default=40.0, help="demo pace; 0 = unpaced")
    parser.add_argument("--demo-jitter", type=float, default=0.3, help="demo relative jitter per gap")
    parser.add_argument("--demo-seed", type=int, default=0)
    parser.add_argument("--demo", choices=DEMO_MODES, default="on", help="built-in demo models: on (keys must name them), off, all-keys")
    parser.add_argument("--max-streams", type=int, default=32, help="concurrent streams per call")
    parser.add_argument("--shutdown-grace-s", type=float, default=5.0)
    parser.add_argument("--resume-grace-s", type=float, default=30.0, help="streams outlive a dropped connection this long")
    parser.add_argument("--heartbeat-interval-s", type=float, default=15.0, help="heartbeat for a stream silent this long")
    parser.add_argument("--slow-client-timeout-s", type=float, default=10.0, help="end a call whose writes block this long")
    parser.add_argument("--max-sessions", type=int, default=100_000)
    parser.add_argument("--stall-threshold-s", type=float, default=2.0, help="a gap between tokens over this is a stall")
    parser.add_argument("--metrics-listen", default="", help="host:port for Prometheus /metrics (e.g. 127.0.0.1:9464)")
    parser.add_argument("--request-log", default="llmproxy-requests.sqlite3", help="SQLite request log; '' turns it off")
    parser.add_argument("--request-log-retention-days", type=float, default=7.0)
    parser.add_argument("--no-analytics", action="store_true", help="no metrics, request log or live stats (to measure their cost)")
    parser.add_argument("--auth-db", default="", help="SQLite API key store (python -m server.auth.cli); empty: no auth")
    parser.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback --listen without --auth-db")
    parser.add_argument("--tls-cert", default="", help="PEM certificate chain for gRPC over TLS")
    parser.add_argument("--tls-key", default="", help="PEM private key for --tls-cert")
    parser.add_argument(
        "--relay-token-file", default="", help="file holding the secret bridges present on the Relay RPC; empty: no bridge may relay"
    )
    parser.add_argument(
        "--grpc-min-ping-interval-ms", type=int, default=10_000, help="clients may send keepalive pings this often (bridges: 30 s)"
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--otlp-endpoint", default="", help="send OpenTelemetry traces (OTLP/HTTP JSON) here, e.g. http://127.0.0.1:4318/v1/traces; empty: off")
    parser.add_argument(
        "--store", default="memory", help="memory (one process), or redis://host:port/db shared by several servers (docs/deploy.md)"
    )
    parser.add_argument("--server-id", default="", help="this server's name in a cluster (default: host-pid-random)")
    parser.add_argument(
        "--takeover-s", type=float, default=3.0, help="with --store redis: a dead server's streams are taken over by another within this"
    )
    parser.add_argument("--routing-seed", type=int, default=None, help="seed the load-balancing and backoff choices (reproducible tests)")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(
        listen=args.listen,
        demo_pace=DemoPace(
            ttft_s=args.demo_ttft_ms / 1000, tokens_per_s=args.demo_tokens_per_s, jitter=args.demo_jitter, seed=args.demo_seed
        ),
        limits=SessionLimits(max_streams=args.max_streams),
        shutdown_grace_s=args.shutdown_grace_s,
        config_path=args.config,
        demo=args.demo,
    )
    service = ServiceSettings(
        limits=replace(config.limits, heartbeat_interval_s=args.heartbeat_interval_s, stall_threshold_s=args.stall_threshold_s),
        resume_grace_s=args.resume_grace_s,
        max_sessions=args.max_sessions,
        slow_client_timeout_s=args.slow_client_timeout_s,
        tick_interval_s=min(1.0, args.heartbeat_interval_s / 2, args.resume_grace_s / 4, args.slow_client_timeout_s / 4),
        takeover_s=args.takeover_s,
    )
    if args.no_analytics:
        args.metrics_listen, args.request_log = "", ""
    return Options(
        config,
        service,
        args.metrics_listen,
        args.request_log,
        args.request_log_retention_days * 86400,
        auth_db=args.auth_db,
        insecure_no_auth=args.insecure_no_auth,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        analytics=not args.no_analytics,
        relay_token_file=args.relay_token_file,
        min_ping_interval_ms=args.grpc_min_ping_interval_ms,
        routing_seed=args.routing_seed,
        otlp_endpoint=args.otlp_endpoint,
        store=args.store,
        server_id=args.server_id,
        also_listen=tuple(args.also_listen),
        reuse_port=args.reuse_port,
    )


def server_options(min_ping_interval_ms: int, reuse_port: bool = False) -> list[tuple[str, int]]:
    """grpc.aio server options. gRPC ignores names it does not know, silently: each name here is
    one of gRPC core's channel arguments (grpc_types.h), and tests/unit/test_grpc_options.py
    checks them against the names the installed library defines."""
    return [
        # Bridges keep their relay alive with pings, with or without data in flight: allow them
        # that often. gRPC's default policy (5 min without data, 2 strikes) answers a 30 s
        # keepalive with GOAWAY too_many_pings.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_interval_ms),
        # Our own pings find dead bridges and backends whose calls would otherwise hang.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.max_receive_message_length", 8 * 1024 * 1024),
        # A connection that has not completed its HTTP/2 preface (and TLS) by then is closed
        # (the default held silent connections for about a minute).
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        # gRPC sets SO_REUSEPORT on its listeners unless told not to: a second server started by
        # mistake on the same port would bind and silently take half the connections. Only
        # --reuse-port (make cluster) shares a port.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]


def is_loopback(listen: str) -> bool:
    """Whether host:port binds only the loopback interface (an empty host or 0.0.0.0 does not)."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(options: Options) -> None:
    """Without keys the proxy serves only loopback: refuses any other address unless the
    operator said --insecure-no-auth (docs/security.md)."""
    if options.auth_db or all(is_loopback(a) for a in (options.config.listen, *options.also_listen)):
        return
    if not options.insecure_no_auth:
        raise SystemExit(
            f"llmproxy-server: refusing to listen on {options.config.listen} without API keys. Create keys with "
            "`python -m server.auth.cli create --db keys.sqlite3` and pass --auth-db keys.sqlite3, listen on "
            "127.0.0.1, or pass --insecure-no-auth to serve anyone who can reach this address."
        )
    log.warning(
        "INSECURE: listening on %s with NO AUTHENTICATION (--insecure-no-auth): anyone who can reach this "
        "address can spend the provider keys",
        options.config.listen,
    )


async def serve(options: Options) -> None:
    config = options.config
    store = open_store(options.store, options.server_id)
    if isinstance(store, RedisStore):
        await store.connect()
        log.info("store: %s, server id %s", store.describe(), store.server_id)
    catalog = build_catalog(config)
    router = Router(catalog, rng=None if options.routing_seed is None else random.Random(options.routing_seed))
    relay_token = read_secret(options.relay_token_file, "llmproxy-server") if options.relay_token_file else ""
    server = grpc.aio.server(options=server_options(options.min_ping_interval_ms, options.reuse_port))
    metrics = Metrics()
    metrics.watch_routing(router)  # issue 19: routing counters and breaker states in /metrics
    request_log = RequestLog(options.request_log, options.request_log_retention_s) if options.request_log else None
    analytics = Analytics(metrics, request_log, LiveWindow(breaker_state=router.breaker_state, breaker_states=router.breaker_states), enabled=options.analytics)
    analytics.live.watch_routing(router)  # failed attempts, retries and failovers on the dashboard
    if isinstance(store, RedisStore) and options.analytics:  # every server's live view and request log
        analytics.cluster = ClusterAnalytics(store)
    if options.otlp_endpoint:
        analytics.tracer = Tracer(OtlpHttpExporter(options.otlp_endpoint))
    key_store = KeyStore(options.auth_db) if options.auth_db else None
    cluster = ClusterKeys(store.redis, store.server_id) if isinstance(store, RedisStore) and key_store is not None else None
    auth = AuthPolicy(key_store, keys_must_name=config.keys_must_name(), cluster=cluster) if key_store is not None else None
    cache = build_cache(config.config_path, catalog)  # issue 16: the response cache (None without `cache:`)
    if cache is not None:
        metrics.watch_cache(cache)
    servicer = LLMProxyServicer(router, catalog, options.service, analytics, auth=auth, cache=cache, store=store)
    if options.metrics_listen:
        from prometheus_client import start_http_server

        mhost, mport = options.metrics_listen.rsplit(":", 1)
        metrics_server, _ = start_http_server(int(mport), mhost, registry=metrics.registry)
        print(f"llmproxy-server metrics on http://{mhost}:{metrics_server.server_port}/metrics", flush=True)
    pb_grpc.add_LLMProxyServicer_to_server(servicer, server)
    pb_grpc.add_RelayServicer_to_server(RelayServicer(servicer, relay_token), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, RELAY_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    addresses = (config.listen, *options.also_listen)
    try:
        if options.tls_cert:
            with open(options.tls_key, "rb") as kf, open(options.tls_cert, "rb") as cf:
                credentials = grpc.ssl_server_credentials([(kf.read(), cf.read())])
            port, *also = [server.add_secure_port(a, credentials) for a in addresses]
        else:
            port, *also = [server.add_insecure_port(a) for a in addresses]
    except RuntimeError:  # grpc's "Failed to bind": the port is taken
        port, also = 0, []
    if port == 0 or 0 in also:
        raise SystemExit(
            f"llmproxy-server: cannot listen on {' '.join(addresses)} (in use? servers share a port only with --reuse-port)"
        )
    await server.start()
    health_names = ("", SERVICE_NAME, RELAY_SERVICE_NAME)
    for name in health_names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    def store_health(healthy: bool) -> None:  # NOT_SERVING while the shared store is unreachable
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in health_names:
            asyncio.ensure_future(health_servicer.set(name, status))

    store.on_health(store_health)
    host = config.listen.rsplit(":", 1)[0]
    print(f"llmproxy-server listening on {host}:{port}", flush=True)
    for address, extra_port in zip(options.also_listen, also):
        print(f"llmproxy-server also listening on {address.rsplit(':', 1)[0]}:{extra_port}", flush=True)
    log.info("serving models: %s", ", ".join(catalog.names()))
    if key_store is not None:
        log.info("authentication on: %d active API keys", sum(not r.revoked for r in key_store.list()))

    jobs = Supervisor(log)
    jobs.start("expire-sessions", servicer.expire_sessions)
    jobs.start("keep-alive", servicer.keep_alive)
    jobs.start("report", servicer.report)
    jobs.start("store-health", store.watch_health)
    shared = servicer.shared
    if shared is not None:  # sessions on Redis (server/store/sessions.py)
        jobs.start("store-writer", shared.write_loop)
        jobs.start("store-follow", shared.follow_loop)
        jobs.start("store-leases", shared.lease_loop)
    if auth is not None:  # revocations with --cancel-streams (server/auth/policy.py)
        jobs.start("revocations", lambda: auth.watch(servicer.cancel_key_streams))
        if auth.cluster is not None:  # the key counters shared in Redis (server/auth/cluster.py)
            jobs.start("key-counters", lambda: auth.sync_cluster(servicer.live_streams_by_key))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    failed = await jobs.wait_failed_or(stop)
    log.info("shutting down: health NOT_SERVING, grace %.1fs", config.shutdown_grace_s)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(config.shutdown_grace_s)
    await jobs.stop()
    if shared is not None:
        await shared.leave()  # what still runs here is taken over at once
    await servicer.aclose()
    await catalog.aclose()
    await analytics.flush()
    if analytics.cluster is not None:
        await analytics.cluster.leave()  # out of the cluster's live view now, not after the TTL
    await store.aclose()
    if analytics.tracer is not None:
        await analytics.tracer.aclose()
    if request_log is not None:
        request_log.close()
    if key_store is not None:
        key_store.close()
    if failed:
        raise SystemExit(f"llmproxy-server: {jobs.failure}")


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    check_exposure(options)
    try:
        run_loop(lambda: serve(options))
    except ConfigError as exc:  # file:line: problem, without a traceback
        print(f"llmproxy-server: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
