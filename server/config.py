"""Server configuration: command-line settings and the deployment catalog they describe.

Without a config file the server serves the built-in `demo` provider (models `demo`, paced like
a real model, and `demo-fast`, unpaced, for benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.catalog import Catalog
from server.core.session import SessionLimits
from server.providers.base import Backend, DeploymentInfo
from server.providers.demo import DemoBackend, DemoPace, load_corpus


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    demo_pace: DemoPace = field(default_factory=DemoPace)
    limits: SessionLimits = field(default_factory=SessionLimits)
    shutdown_grace_s: float = 5.0
    config_path: str | None = None


def build_catalog(config: ServerConfig) -> Catalog:
    corpus = load_corpus()
    models: dict[str, list[Backend]] = {
        "demo": [DemoBackend(DeploymentInfo("demo", "demo", "demo-corpus"), config.demo_pace, corpus)],
        "demo-fast": [
            DemoBackend(
                DeploymentInfo("demo-fast", "demo", "demo-corpus"),
                DemoPace(ttft_s=0.0, tokens_per_s=0.0, jitter=0.0, seed=config.demo_pace.seed),
                corpus,
            )
        ],
    }
    return Catalog(models)
