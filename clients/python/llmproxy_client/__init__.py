"""llmproxy Python client (gRPC and WebSocket)."""
