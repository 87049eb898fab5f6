"""Images in, index vectors and query vectors out: decode, resize, one backbone run per batch, recipes."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from inserve.server.config import ImageConfig
from inserve.server.imaging import NetworkInput, decode_image, prepare, validate_box
from inserve.server.models import ModelBundle
from inserve.server.recipes import FeatureBatch, ImageVectors, QueryVector, Recipe


class Pipeline:
    def __init__(self, models: ModelBundle, recipes: dict[str, Recipe], image: ImageConfig, max_batch: int = 8) -> None:
        self.models = models
        self.recipes = recipes
        self.image = image
        self.max_batch = max_batch

    def load(self, data: bytes) -> NetworkInput:
        """Decoded, checked and resized; raises ImageError with the reason."""
        image = decode_image(data, self.image)
        return prepare(image, self.image.long_side, self.models.size_multiple, self.image.thumbnail_side)

    def batches(self, inputs: list[NetworkInput]) -> list[tuple[list[int], FeatureBatch]]:
        """Group images by network size and run the backbone once per group of up to max_batch."""
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, inp in enumerate(inputs):
            by_size[inp.pixels.shape].append(i)
        out = []
        for indices in by_size.values():
            for start in range(0, len(indices), self.max_batch):
                chunk = indices[start : start + self.max_batch]
                pixels = np.stack([inputs[i].pixels for i in chunk])
                maps = self.models.features(pixels)
                out.append((chunk, FeatureBatch([inputs[i] for i in chunk], pixels, maps, self.models)))
        return out

    def describe(self, inputs: list[NetworkInput], recipes: list[str] | None = None) -> list[dict[str, ImageVectors]]:
        """For each image, its vectors under each recipe (all the pipeline's recipes by default)."""
        names = list(self.recipes) if recipes is None else recipes
        described: list[dict[str, ImageVectors]] = [{} for _ in inputs]
        for indices, batch in self.batches(inputs):
            for name in names:
                for i, vectors in zip(indices, self.recipes[name].describe(batch)):
                    described[i][name] = vectors
        return described

    def query(self, inp: NetworkInput, box: tuple[float, float, float, float] | None, recipe: str) -> QueryVector:
        """Query vector of an image and an optional box in original pixels."""
        return self.queries(inp, box, [recipe])[recipe]

    def queries(
        self, inp: NetworkInput, box: tuple[float, float, float, float] | None, recipes: list[str]
    ) -> dict[str, QueryVector]:
        """Query vectors of several recipes from one backbone run (and shared region sources)."""
        net_box = None
        if box is not None:
            net_box = inp.to_network(np.array(validate_box(box, inp.width, inp.height), dtype=np.float32))
        ((_, batch),) = self.batches([inp])
        return {name: self.recipes[name].query(batch, net_box) for name in recipes}
