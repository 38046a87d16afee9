"""A tiny forward proxy on 127.0.0.1 for the egress tests: CONNECT tunnels (RFC 9110 9.3.6) and
absolute-form http:// requests (RFC 9112 3.2.2), with its own name table instead of DNS, so a
test can reach "upstream.test" (a name no resolver knows, RFC 6761) only through it."""

from __future__ import annotations

import asyncio
import contextlib


class ForwardProxy:
    """`routes` maps "host:port" to the (ip, port) it really is. `auth`: the Proxy-Authorization
    value to require (None: none). `heads` records every request head the proxy read."""

    def __init__(self, routes: dict[str, tuple[str, int]], auth: str | None = None) -> None:
        self.routes = routes
        self.auth = auth
        self.heads: list[bytes] = []
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> ForwardProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:  # ends both pipes of every tunnel: the tasks finish
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            lines = head[:-4].split(b"\r\n")
            method, target, version = lines[0].split(b" ")
            fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
            if self.auth is not None and fields.get(b"proxy-authorization", b"").decode() != self.auth:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            if method == b"CONNECT":
                authority, rest = target.decode(), b""
            else:  # absolute-form: http://host[:port]/path
                after = target.decode().removeprefix("http://")
                authority, slash, path = after.partition("/")
                kept = [line for line in lines[1:] if not line.lower().startswith(b"proxy-authorization:")]
                rest = b"\r\n".join([b"%s /%s %s" % (method, path.encode(), version), *kept]) + b"\r\n\r\n"
            if ":" not in authority.rsplit("]", 1)[-1]:
                authority += ":443" if method == b"CONNECT" else ":80"
            host, port = self.routes[authority]
            up_reader, up_writer = await asyncio.open_connection(host, port)
            self._writers += (writer, up_writer)
            if method == b"CONNECT":
                writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            else:
                up_writer.write(rest)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError, KeyError):
            pass
        finally:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()
