"""Providers: one module per provider, each a pure transform, plus the backends that run them."""
