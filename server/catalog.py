"""The catalog: public model names -> the backends (deployments) that serve them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from server.errors import UnknownModel
from server.providers.base import Backend


class Catalog:
    def __init__(self, models: Mapping[str, Sequence[Backend]]) -> None:
        self._models = {name: tuple(backends) for name, backends in sorted(models.items())}

    def __contains__(self, model: object) -> bool:
        return model in self._models

    def names(self) -> list[str]:
        return list(self._models)

    def backends(self, model: str) -> tuple[Backend, ...]:
        """The deployments of `model` in configured order; raises `UnknownModel`."""
        try:
            return self._models[model]
        except KeyError:
            raise UnknownModel(f"unknown model {model!r}") from None

    async def aclose(self) -> None:
        seen: set[int] = set()
        for backends in self._models.values():
            for backend in backends:
                if id(backend) not in seen:
                    seen.add(id(backend))
                    await backend.aclose()
