"""llmproxy Python client over gRPC.

    async with LLMProxyClient("127.0.0.1:50051") as client:
        async for token in client.stream(model="demo", messages=[{"role": "user", "content": "Hi"}]):
            print(token, end="", flush=True)

Many streams share one bidirectional call; each `stream()` returns a handle that is an async
iterator of token texts, with `cancel()` and `result()` (the `done` frame, or `LLMProxyError`).
"""

from llmproxy_client.grpc_client import LLMProxyClient, LLMProxyError, StreamHandle
from llmproxy_client.backoff import Backoff
from llmproxy_client.ws_client import WSClient, WSStream

__all__ = ["Backoff", "LLMProxyClient", "LLMProxyError", "StreamHandle", "WSClient", "WSStream"]
