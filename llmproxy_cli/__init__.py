"""`llmproxy`: one command for what took `python -m ...` (serve, bridge, keys, stats) and a
terminal chat client.

    llmproxy serve [server options]     python -m server.main        (the gRPC server)
    llmproxy bridge [bridge options]    python -m bridge.main        (the WebSocket bridge)
    llmproxy keys create|list|revoke    python -m server.auth.cli    (API keys)
    llmproxy stats --db PATH            python -m server.analytics.cli (the request log's aggregates)
    llmproxy chat [PROMPT]              stream answers with per-token timing; Ctrl-C stops one

Each subcommand takes the options of the module it runs (`llmproxy serve --help`).
"""
