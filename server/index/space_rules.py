"""What both stores share of their spaces' settings and maths: each space's SpaceSpec, a query's raw vector into
a space's coordinates, and per-image aggregates combined from their parts in the parts' current transform."""

from __future__ import annotations

import numpy as np

from inserve.server.index.protocol import Space
from inserve.server.index.spaces import DEFAULT_SPEC, Aggregate, SpaceSpec, combine_per_image
from inserve.server.stages.pooling import l2_normalize


class SpaceRules:
    """The rules of an index's spaces, mixed into each store; it needs the store's `specs`, `space` and `learned`."""

    specs: dict[tuple[str, str], SpaceSpec]

    def space(self, recipe: str, kind: str) -> Space | None:
        raise NotImplementedError

    def spec(self, recipe: str, kind: str) -> SpaceSpec:
        return self.specs.get((recipe, kind), DEFAULT_SPEC)

    def _aggregates(self, recipe: str | None = None, source: str | None = None) -> list[tuple[str, str]]:
        """The aggregate spaces (of a recipe; of parts of one kind)."""
        return [
            key
            for key, spec in self.specs.items()
            if spec.aggregate is not None and recipe in (None, key[0]) and source in (None, spec.aggregate.source)
        ]

    def learned(self, recipe: str, name: str) -> tuple[int, np.ndarray, str] | None:
        raise NotImplementedError

    def transform(self, recipe: str, kind: str, raw: np.ndarray) -> np.ndarray:
        """A query's raw vector -> the space's coordinates; for an aggregate, raw parts (n, D) -> its vector."""
        space = self.space(recipe, kind)
        if space is None:
            raise KeyError(f"{recipe}/{kind} holds no vectors")
        aggregate = self.spec(recipe, kind).aggregate
        if aggregate is None:
            return space.transform(raw)[0]
        combined = self.combine(recipe, aggregate, np.atleast_2d(raw))
        if combined is None:
            raise KeyError(f"{recipe}/{kind} cannot be built yet")
        return space.transform(combined)[0]

    def _parts(self, recipe: str, aggregate: Aggregate, raw: np.ndarray) -> np.ndarray:
        source = self.space(recipe, aggregate.source)
        if aggregate.on_raw or source is None:
            return l2_normalize(raw)
        return source.transform(raw)

    def _learned_data(self, recipe: str, name: str) -> np.ndarray | None:
        found = self.learned(recipe, name)
        return None if found is None else found[1]

    def combine(self, recipe: str, aggregate: Aggregate, raw: np.ndarray) -> np.ndarray | None:
        """One aggregate vector from raw parts (n, D), in the parts' current whitening; None = cannot yet."""
        return aggregate.combine(self._parts(recipe, aggregate, raw), lambda name: self._learned_data(recipe, name))

    def combine_groups(
        self, recipe: str, aggregate: Aggregate, labels: np.ndarray, image_ids: np.ndarray, raw: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Combine parts per image: image ids, first labels and aggregate vectors (raw, before whitening)."""
        parts = self._parts(recipe, aggregate, raw) if len(labels) else raw
        return combine_per_image(aggregate, parts, labels, image_ids, lambda name: self._learned_data(recipe, name))
