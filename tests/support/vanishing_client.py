"""A WebSocket client process for the vanished-client test: it connects, starts a slow stream,
prints its session, then waits to be stopped with SIGSTOP (it never closes)."""

import asyncio
import sys

import orjson
from websockets.asyncio.client import connect


async def main(url: str) -> None:
    ws = await connect(url)
    session = orjson.loads(await ws.recv())
    await ws.send(orjson.dumps({"type": "start", "id": "v", "model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}).decode())
    print(session["session_id"], session["resume_token"], flush=True)
    await asyncio.sleep(3600)


asyncio.run(main(sys.argv[1]))
