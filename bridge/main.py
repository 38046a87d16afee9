"""Entry point: `python -m bridge.main`. Builds everything in `main()`; no module globals.

Prints `llmproxy-bridge listening on ws://HOST:PORT/stream` once serving (tests read the port
from it when started with port 0). SIGINT/SIGTERM close the listener and every connection.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys
from pathlib import Path

import grpc

from bridge.http_api import HttpApi, HttpConfig
from bridge.pool import parse_targets
from bridge.secret_file import read_secret
from bridge.server import Bridge, BridgeConfig
from bridge.supervisor import Supervisor, run_loop

log = logging.getLogger("llmproxy.bridge")


def parse_args(argv: list[str] | None) -> tuple[BridgeConfig, HttpConfig | None]:
    root = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(prog="llmproxy-bridge", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0: any free port")
    parser.add_argument("--grpc-target", default="127.0.0.1:50051", help="the server, or several: host:p1,host:p2 (docs/deploy.md)")
    parser.add_argument("--reuse-port", action="store_true", help="SO_REUSEPORT: several bridges share --port and --http-port (make cluster)")
    parser.add_argument("--max-frame-bytes", type=int, default=1 << 20)
    parser.add_argument("--ping-interval-s", type=float, default=20.0)
    parser.add_argument("--ping-timeout-s", type=float, default=20.0)
    parser.add_argument("--send-buffer-bytes", type=int, default=64 * 1024, help="kernel send buffer per WebSocket; 0: the OS default")
    parser.add_argument("--allowed-origin", action="append", default=[], help="exact Origin to accept (repeatable)")
    parser.add_argument("--open-timeout-s", type=float, default=10.0, help="the opening handshake must complete within this")
    parser.add_argument("--max-messages", type=int, default=1024, help="messages per start/modify frame")
    parser.add_argument("--tls-cert", default="", help="PEM certificate chain: serve wss:// (and https://)")
    parser.add_argument("--tls-key", default="", help="PEM private key for --tls-cert")
    parser.add_argument("--grpc-ca", default="", help="PEM CA bundle: gRPC over TLS to the server")
    parser.add_argument("--relay-token-file", default="", help="file holding the secret of the server's Relay RPC (required)")
    parser.add_argument("--grpc-keepalive-ms", type=int, default=30_000, help="keepalive ping interval on the relay's channel")
    parser.add_argument("--max-pending-bytes", type=int, default=1 << 20, help="unsent output one WebSocket may hold before it is cut")
    parser.add_argument("--reattach-timeout-s", type=float, default=10.0, help="how long a connection waits for the server, then fails")
    parser.add_argument("--http-port", type=int, default=-1, help="OpenAI/Anthropic-compatible HTTP APIs (0: any free port; -1: off)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if not args.relay_token_file:
        parser.error("--relay-token-file is required: the same file as the server's (make run creates one)")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    static = {"/": root / "static"}
    js_dir = root.parent / "clients" / "js"
    if js_dir.is_dir():
        static["/js/"] = js_dir
    http = None
    if args.http_port >= 0:
        http = HttpConfig(
            host=args.host,
            port=args.http_port,
            max_body_bytes=args.max_frame_bytes,
            max_messages=args.max_messages,
            reattach_timeout_s=args.reattach_timeout_s,
            max_pending_bytes=args.max_pending_bytes,
            reuse_port=args.reuse_port,
        )
    try:
        parse_targets(args.grpc_target)
    except ValueError as exc:
        parser.error(str(exc))
    return BridgeConfig(
        host=args.host,
        port=args.port,
        grpc_target=args.grpc_target,
        max_frame_bytes=args.max_frame_bytes,
        ping_interval_s=args.ping_interval_s,
        ping_timeout_s=args.ping_timeout_s,
        send_buffer_bytes=args.send_buffer_bytes,
        allowed_origins=tuple(args.allowed_origin),
        static_dirs=static,
        open_timeout_s=args.open_timeout_s,
        max_messages=args.max_messages,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        grpc_ca=args.grpc_ca,
        relay_token=read_secret(args.relay_token_file, "llmproxy-bridge"),
        grpc_keepalive_ms=args.grpc_keepalive_ms,
        max_pending_bytes=args.max_pending_bytes,
        reattach_timeout_s=args.reattach_timeout_s,
        reuse_port=args.reuse_port,
    ), http


def channel_options(keepalive_ms: int) -> list[tuple[str, int]]:
    """Options of the channel to the server. gRPC ignores names it does not know, silently:
    each is one of gRPC core's channel arguments, checked against the installed library by
    tests/unit/test_grpc_options.py."""
    return [
        # Keepalive within the server's policy (its --grpc-min-ping-interval-ms, 10 s by default),
        # so a dead server or a cut relay is noticed without ever earning GOAWAY too_many_pings.
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # the relay may idle for hours
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),  # one batch carries many frames
    ]


def cannot_listen(host: str, port: int, exc: OSError) -> str:
    return f"llmproxy-bridge: cannot listen on {host}:{port}: {exc.strerror or exc} (in use? bridges share a port only with --reuse-port)"


async def serve(config: BridgeConfig, http_config: HttpConfig | None = None) -> None:
    options = channel_options(config.grpc_keepalive_ms)
    channels: list[grpc.aio.Channel] = []
    for target in parse_targets(config.grpc_target):  # one channel and one relay call per server
        if config.grpc_ca:
            ca = Path(config.grpc_ca).read_bytes()
            channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca), options)
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        channel.get_state(try_to_connect=True)  # connect now: the first stream should not pay for it
        channels.append(channel)
    bridge = Bridge(config, channels)
    try:
        server = await bridge.start()
    except OSError as exc:
        raise SystemExit(cannot_listen(config.host, config.port, exc)) from None
    jobs = Supervisor(log)
    jobs.start("relay", bridge.relay.run)
    jobs.start("watchdog", bridge.watchdog)
    http: HttpApi | None = None
    if http_config is not None:
        http = HttpApi(http_config, bridge.relay, bridge.origin_allowed)
        tls = None
        if config.tls_cert:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(config.tls_cert, config.tls_key)
        try:
            await http.start(tls)
        except OSError as exc:
            raise SystemExit(cannot_listen(http_config.host, http_config.port, exc)) from None
        http_scheme = "https" if config.tls_cert else "http"
        print(f"llmproxy-bridge http on {http_scheme}://{http_config.host}:{http.port}", flush=True)
    port = next(iter(server.sockets)).getsockname()[1]
    scheme = "wss" if config.tls_cert else "ws"
    print(f"llmproxy-bridge listening on {scheme}://{config.host}:{port}/stream", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    failed = await jobs.wait_failed_or(stop)
    log.info("shutting down")
    await jobs.stop()
    if http is not None:
        await http.stop()
    server.close()
    await server.wait_closed()
    for channel in channels:
        await channel.close()
    if failed:
        raise SystemExit(f"llmproxy-bridge: {jobs.failure}")


def main(argv: list[str] | None = None) -> None:
    config, http_config = parse_args(argv)
    run_loop(lambda: serve(config, http_config))


if __name__ == "__main__":
    main(sys.argv[1:])
