"""The WebSocket bridge: browser JSON frames <-> one gRPC bidi call per connection."""
