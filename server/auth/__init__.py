"""Client authentication and per-key limits: the key store, the limiter and the policy."""
