"""The response cache: exact and semantic answers replayed as streams (docs/caching.md)."""
