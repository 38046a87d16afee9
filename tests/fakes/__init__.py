"""Fake LLM providers that speak each provider's real wire format (see base.py)."""
