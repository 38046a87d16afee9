"""`make bench`: the proxy chain measured side by side against direct reads, in one run.

Modules: `fake_upstream` (a fast fake OpenAI server, its own process), `clients` (the three
load-client paths: direct SSE, WebSocket through bridge and server, gRPC to the server),
`workloads` (what runs, full and smoke sizes), `measure` (runs one workload over the paths,
with each process's CPU), `idle` (idle sessions and their memory), `stats`, `report`
(markdown and JSON), `profile` (py-spy summaries) and `run` (the command line).
"""
