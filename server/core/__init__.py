"""The sans-I/O core: stream and session state machines. Imports no asyncio, grpc or httpx."""
