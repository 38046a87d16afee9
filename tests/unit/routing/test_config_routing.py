"""server/config.py: routing keys (strategy, fallbacks, after_first_token, retry, breaker, budget)."""

from __future__ import annotations

import textwrap

import pytest

from server.config import ConfigError, load_config
from server.providers.registry import providers
from server.routing import AfterFirstToken, BudgetPolicy, Strategy

ENV = {"OPENAI_API_KEY": "sk-o", "ANTHROPIC_API_KEY": "sk-a"}


def load(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(str(path), providers(), ENV)


def test_routing_defaults_model_overrides_and_both_forms(tmp_path):
    config = load(tmp_path, """
        routing:
          strategy: least_inflight
          retry: {max_attempts: 2, deadline_s: 5}
          budget: {percent: 10, min_concurrent: 4}
        models:
          chat:
            strategy: lowest_latency
            fallbacks: [mini]
            after_first_token: continue
            breaker: {failures: 2, cooldown_s: 1}
            deployments:
              - {provider: anthropic, model: claude-sonnet-4-5, weight: 3}
              - {provider: openai, model: gpt-4o, weight: 1}
          mini:
            provider: openai
            model: gpt-4o-mini
            retry: {max_attempts: 1}
          plain:
            - {provider: openai}
        """)
    assert [d.model for d in config.deployments] == ["chat", "chat", "mini", "plain"]
    chat, mini = config.routes["chat"], config.routes["mini"]
    assert chat.strategy is Strategy.LOWEST_LATENCY and chat.fallbacks == ("mini",)
    assert chat.after_first_token is AfterFirstToken.CONTINUE and chat.breaker.failures == 2
    assert chat.retry.max_attempts == 2 and chat.retry.deadline_s == 5
    assert mini.strategy is Strategy.LEAST_INFLIGHT and mini.retry.max_attempts == 1 and mini.retry.deadline_s == 5
    assert "plain" not in config.routes and config.default_route.strategy is Strategy.LEAST_INFLIGHT
    assert config.budget == BudgetPolicy(10, 4)


@pytest.mark.parametrize("text, problem", [
    ("models:\n  a: {provider: openai, strategy: fastest}\n", "expected one of weighted"),
    ("models:\n  a: {provider: openai, fallbacks: [nope]}\n", "falls back to 'nope'"),
    ("models:\n  a: {provider: openai, fallbacks: [a]}\n", "cannot fall back to itself"),
    ("models:\n  a: {provider: openai, retry: {max_attempts: 0}}\n", "must be greater than 0"),
    ("routing: {budget: {percent: -1}}\n", "must be greater than 0"),
])
def test_routing_mistakes_name_the_line(tmp_path, text, problem):
    with pytest.raises(ConfigError, match=problem):
        load(tmp_path, text)
