"""llmproxy server: the grpc.aio service, its sans-I/O stream core, providers and routing."""
