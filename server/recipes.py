"""Recipes: named combinations of stages that turn backbone maps into the vectors an index stores."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from inserve.server.config import ServerConfig
from inserve.server.imaging import NetworkInput
from inserve.server.index import NewVectors
from inserve.server.models import ModelBundle
from inserve.server.stages.dasr import Regions, dasr_regions
from inserve.server.stages.pooling import box_average, box_cells, gem


@dataclass
class FeatureBatch:
    """Images of one shape bucket after one backbone run; recipes share it and what they derive from it.

    `pixels` is the padded batch the engines run on: image i fills pixels[i, :, :h_i, :w_i]. Each
    image's maps are cropped back to the cells of its own pixels (`maps[name][i]`), so no pooling or
    peak search sees the padding; `logits` come from the graph's pooling over the padded map.
    """

    inputs: list[NetworkInput]
    pixels: np.ndarray  # (B, 3, H, W)
    maps: dict[str, list[np.ndarray]]  # feat, desc: per image (C, h_i, w_i); logits: per image (K,)
    models: ModelBundle
    derived: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of each image's own pixels inside the padded batch."""
        return [(inp.pixels.shape[1], inp.pixels.shape[2]) for inp in self.inputs]

    def subset(self, indices: list[int]) -> FeatureBatch:
        """The same run restricted to some of its images (what they derive is computed again)."""
        return FeatureBatch(
            [self.inputs[i] for i in indices],
            self.pixels[indices],
            {name: [maps[i] for i in indices] for name, maps in self.maps.items()},
            self.models,
        )


@dataclass(frozen=True)
class ImageVectors:
    """What one image adds to the index under one recipe; `regions` in original pixels."""

    vectors: list[NewVectors]
    regions: Regions


@dataclass(frozen=True)
class QueryVector:
    kind: str  # the vector space searched: "global" or "region"
    raw: np.ndarray


class Recipe(ABC):
    name: str
    search_kind: str

    @abstractmethod
    def describe(self, batch: FeatureBatch) -> list[ImageVectors]:
        """Vectors for every image of the batch."""

    @abstractmethod
    def query(self, batch: FeatureBatch, box: np.ndarray | None) -> QueryVector:
        """The query vector of a single-image batch; `box` in network pixels, None = the whole image."""


def _whole(inp: NetworkInput) -> np.ndarray:
    return np.array([0, 0, inp.pixels.shape[2], inp.pixels.shape[1]], dtype=np.float32)


class GemRecipe(Recipe):
    """Baseline: GeM (p = 3) over the last conv map, one global vector per image."""

    search_kind = "global"

    def __init__(self, name: str = "gem", p: float = 3.0) -> None:
        self.name, self.p = name, p

    def describe(self, batch: FeatureBatch) -> list[ImageVectors]:
        return [
            ImageVectors([NewVectors(self.name, "global", gem(feat, self.p)[None])], Regions.empty())
            for feat in batch.maps["feat"]
        ]

    def query(self, batch: FeatureBatch, box: np.ndarray | None) -> QueryVector:
        feat = batch.maps["feat"][0]
        if box is not None:
            stride = batch.models.layer("feat")["stride"]
            x0, y0, x1, y1 = box_cells(box, stride, feat.shape[1], feat.shape[2])[0]
            feat = feat[:, y0:y1, x0:x1]
        return QueryVector("global", gem(feat, self.p))


class DasrRecipe(Recipe):
    """Seed 004: DASR / DASR* regions, each described by the average of `desc` inside its box.

    Instance-level search: an image scores by its best-matching region. An image where no region
    is found is indexed with one region covering it whole, so that it can still be found.
    """

    search_kind = "region"

    def __init__(self, name: str, peaks: str, config: ServerConfig) -> None:
        self.name, self.peaks, self.config = name, peaks, config.dasr

    def regions(self, batch: FeatureBatch) -> list[Regions]:
        """Regions in network pixels, computed once per batch and peak finder."""
        key = f"regions:{self.peaks}:{self.config}"
        if key not in batch.derived:
            stride = self.config.stop_stride or batch.models.default_stop_stride
            engine = batch.models.backprop(stride)
            batch.derived[key] = dasr_regions(
                engine, stride, batch.pixels, batch.maps["feat"], batch.sizes, self.peaks, self.config
            )
        return batch.derived[key]

    def describe(self, batch: FeatureBatch) -> list[ImageVectors]:
        stride = batch.models.layer("desc")["stride"]
        described = []
        for inp, desc, regions in zip(batch.inputs, batch.maps["desc"], self.regions(batch)):
            if len(regions.boxes) == 0:
                regions = Regions(_whole(inp)[None], np.zeros(1, dtype=np.float32))
            boxes = inp.to_original(regions.boxes)
            vectors = NewVectors(self.name, "region", box_average(desc, regions.boxes, stride), boxes, regions.scores)
            described.append(ImageVectors([vectors], Regions(boxes, regions.scores)))
        return described

    def query(self, batch: FeatureBatch, box: np.ndarray | None) -> QueryVector:
        box = _whole(batch.inputs[0]) if box is None else box
        stride = batch.models.layer("desc")["stride"]
        return QueryVector("region", box_average(batch.maps["desc"][0], box[None], stride)[0])


RECIPES: dict[str, Callable[[ServerConfig], Recipe]] = {
    "gem": lambda config: GemRecipe(),
    "dasr": lambda config: DasrRecipe("dasr", "dasr", config),
    "dasr_star": lambda config: DasrRecipe("dasr_star", "dasr_star", config),
}


def build_recipes(names: tuple[str, ...] | list[str], config: ServerConfig) -> dict[str, Recipe]:
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise ValueError(f"unknown recipe(s) {unknown}; choose from {sorted(RECIPES)}")
    return {name: RECIPES[name](config) for name in names}
