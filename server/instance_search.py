"""The service without its transport: index, search, delete, stats over one data directory.

The gRPC servicer and `inserve eval` both drive this class, so evaluation measures exactly what
the server does.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from inserve.server.config import ServerConfig
from inserve.server.imaging import NetworkInput
from inserve.server.index import InstanceIndex, SpaceStats
from inserve.server.models import ModelBundle
from inserve.server.pipeline import Pipeline
from inserve.server.recipes import ImageVectors, build_recipes
from inserve.server.search import Hit, SearchOptions, search

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request that cannot be served as asked (unknown recipe, bad top_k...); the message says why."""


@dataclass(frozen=True)
class Indexed:
    external_id: str
    width: int
    height: int
    described: dict[str, ImageVectors]


@dataclass(frozen=True)
class Stats:
    images: int
    regions: int
    spaces: list[SpaceStats]
    backbone: str
    recipes: tuple[str, ...]


class InstanceSearch:
    def __init__(self, config: ServerConfig, models: ModelBundle | None = None) -> None:
        self.config = config
        self.models = models or ModelBundle.open(config.models, config.backbone, config.engine)
        self.recipes = build_recipes(config.recipes, config)
        self.pipeline = Pipeline(self.models, self.recipes, config.image)
        self.index = InstanceIndex(config.data_dir, config.index)
        self._whitening = threading.Lock()

    def load(self, data: bytes) -> NetworkInput:
        return self.pipeline.load(data)

    def describe(self, inputs: list[NetworkInput]) -> list[dict[str, ImageVectors]]:
        return self.pipeline.describe(inputs)

    def store(
        self,
        external_id: str,
        inp: NetworkInput,
        described: dict[str, ImageVectors],
        *,
        source: str = "",
        metadata: dict[str, str] | None = None,
        replace: bool = False,
    ) -> Indexed:
        """Commit one described image (raises DuplicateId unless `replace`); learns whitening when due."""
        vectors = [v for image_vectors in described.values() for v in image_vectors.vectors]
        self.index.add_image(
            external_id,
            vectors,
            width=inp.width,
            height=inp.height,
            source=source,
            metadata=metadata,
            replace=replace,
            thumbnail=inp.thumbnail,
        )
        self._whiten_when_due()
        return Indexed(external_id, inp.width, inp.height, described)

    def index_image(self, external_id: str, data: bytes, **kwargs: object) -> Indexed:
        inp = self.load(data)
        (described,) = self.describe([inp])
        return self.store(external_id, inp, described, **kwargs)

    def _whiten_when_due(self) -> None:
        if not self._whitening.acquire(blocking=False):
            return
        try:
            for space in self.index.stats():
                if self.index.whitening_due(space.recipe, space.kind):
                    self.index.learn_whitening(space.recipe, space.kind)
        finally:
            self._whitening.release()

    def recipe_name(self, recipe: str) -> str:
        name = recipe or self.config.default_recipe
        if name not in self.recipes:
            raise RequestError(f"unknown recipe {name!r}; this server indexes with {list(self.recipes)}")
        return name

    def top_k(self, top_k: int) -> int:
        if top_k < 0 or top_k > self.config.max_top_k:
            raise RequestError(f"top_k must be between 1 and {self.config.max_top_k} (0 = default), got {top_k}")
        return top_k or self.config.default_top_k

    def search(
        self,
        data: bytes | NetworkInput,
        box: tuple[float, float, float, float] | None = None,
        top_k: int = 0,
        recipe: str = "",
        options: SearchOptions = SearchOptions(),
    ) -> list[Hit]:
        name = self.recipe_name(recipe)
        k = self.top_k(top_k)
        if options.query_expansion < 0 or options.query_expansion > self.config.max_top_k:
            raise RequestError(f"query_expansion must be between 0 and {self.config.max_top_k}")
        inp = data if isinstance(data, NetworkInput) else self.load(data)
        query = self.pipeline.query(inp, box, name)
        return search(self.index, name, query, k, options)

    def delete(self, external_ids: list[str]) -> tuple[int, list[str]]:
        return self.index.delete(external_ids)

    def learn_whitening(self, recipe: str | None = None) -> dict[tuple[str, str], int]:
        """(Re)learn whitening of every space (of one recipe) from all its raw vectors."""
        with self._whitening:
            return {
                (s.recipe, s.kind): self.index.learn_whitening(s.recipe, s.kind)
                for s in self.index.stats()
                if recipe in (None, s.recipe) and s.vectors >= 2
            }

    def relearn_whitening(self) -> None:
        """Learn whitening from all vectors of every space that holds enough of them (batch indexing)."""
        with self._whitening:
            for s in self.index.stats():
                if self.index.can_whiten(s.recipe, s.kind):
                    self.index.learn_whitening(s.recipe, s.kind)

    def stats(self) -> Stats:
        spaces = self.index.stats()
        regions = sum(s.vectors for s in spaces if s.kind == "region")
        return Stats(self.index.count_images(), regions, spaces, self.models.name, tuple(self.recipes))

    def close(self) -> None:
        self.index.close()
