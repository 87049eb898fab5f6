"""What every recipe shares: the batch of backbone maps it reads, what it returns, and the Recipe interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from inserve.server.imaging import NetworkInput
from inserve.server.index import NewVectors, SpaceSpec
from inserve.server.models import ModelBundle
from inserve.server.stages.dasr import Regions, batch_functionals
from inserve.server.stages.pooling import box_cells


@dataclass
class FeatureBatch:
    """Images of one shape bucket after one backbone run; recipes share it and what they derive from it.

    `pixels` is the padded batch the engines run on: image i fills pixels[i, :, :h_i, :w_i] (its own pixels
    are `inputs[i].pixels`). Each image's maps are cropped back to the cells of its own pixels
    (`maps[name][i]`), so no pooling or peak search sees the padding; `logits` come from the graph's pooling
    over the padded map.
    """

    inputs: list[NetworkInput]
    pixels: np.ndarray  # (B, 3, H, W)
    maps: dict[str, list[np.ndarray]]  # feat, desc: per image (C, h_i, w_i); logits: per image (K,)
    models: ModelBundle
    derived: dict[str, object] = field(default_factory=dict)
    # DASR peak kinds the recipes describing this batch ask for: computed together, in one back-propagation
    dasr_peaks: tuple[str, ...] = ()
    # the stop stride of maps["moments"] (every feat cell's DASR moments, from the backbone's run), if it ran
    moments_stride: int | None = None

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
            moments_stride=self.moments_stride,
        )

    @staticmethod
    def run(models: ModelBundle, pixels: np.ndarray, moments_stride: int | None = None) -> FeatureBatch:
        """One backbone run over same-size images (B, 3, H, W) that have no original beyond themselves and
        no padding (crops re-embedded at their own size); with `moments_stride`, the moments graph's run, which
        gives every feat cell's DASR moments to that stride with the backbone's maps."""
        inputs = [NetworkInput(np.ascontiguousarray(p), p.shape[2], p.shape[1]) for p in pixels]
        if moments_stride is None:
            maps = models.features(pixels)
        else:
            sizes = [(p.shape[1], p.shape[2]) for p in pixels]
            maps = models.features_and_moments(pixels, moments_stride, batch_functionals(pixels, sizes, moments_stride))
        return FeatureBatch(
            inputs, pixels, {name: list(out) for name, out in maps.items()}, models, moments_stride=moments_stride
        )

    def cached(self, key: str, compute: Callable[[], object]) -> object:
        """A value derived from the batch, computed once however many recipes ask for it."""
        if key not in self.derived:
            self.derived[key] = compute()
        return self.derived[key]

    def cams(self) -> list[dict[str, np.ndarray]]:
        """Per image: classes (N,), scores (N,), cams (N, h, w) of its top-N classes, on its own `feat` cells."""

        def compute() -> list[dict[str, np.ndarray]]:
            found = []
            for feat, logits in zip(self.maps["feat"], self.maps["logits"]):
                out = self.models.cams(np.ascontiguousarray(feat[None]), np.ascontiguousarray(logits[None]))
                found.append({name: value[0] for name, value in out.items()})
            return found

        return self.cached("cams", compute)

    def stride(self, layer: str) -> int:
        return self.models.layer(layer).stride


@dataclass(frozen=True)
class ImageVectors:
    """What one image adds to the index under one recipe; `regions` in original pixels."""

    vectors: list[NewVectors]
    regions: Regions


@dataclass(frozen=True)
class QueryVector:
    """A query in a recipe's terms.

    `raw` is one vector of the first-stage space `kind`, or the parts (n, D) when `kind` is an aggregate.
    `rerank` is the query region's vector in the recipe's re-ranking space; `tags` restricts an aggregate to
    the parts with these tags (seed 001's online aggregation over the query's classes).
    """

    kind: str
    raw: np.ndarray
    rerank: np.ndarray | None = None
    tags: np.ndarray | None = None
    regions: np.ndarray | None = None  # (m, D) raw region vectors, the query's crop first (region-set recipes)
    whole: np.ndarray | None = None  # a query without a box: the photo's vector in the recipe's "global" space
    crop_views: int = 1  # region-set queries: the first rows of `regions` are views of the crop (the best counts)


class Recipe(ABC):
    name: str
    search_kind: str  # the first-stage space: "global" or "region"
    rerank_kind: str | None = None  # the space of regions that spatial re-ranking compares
    region_source: str = ""  # what produced the boxes ("dasr_star", "rmac_grid", "detector_rpn"...)
    default_rerank: int = 0  # re-rank the top N when the request does not say
    default_query_expansion: int = 0
    learned_models: tuple[str, ...] = ()  # models learned on other data that search needs (e.g. "codebook")
    dasr_peaks: tuple[str, ...] = ()  # the DASR peak kinds ("dasr", "dasr_star") `describe` uses
    # region-set recipes: an image scores by all the query's regions (search.region_set_search) with this weight
    region_set_weight: float | None = None
    box_temperature: float = 0.0  # region-set recipes: how hits' boxes average their regions (stages.matching)
    whole_weight: float = 0.0  # region-set recipes: weight of the photos' similarity for queries without a box

    @abstractmethod
    def describe(self, batch: FeatureBatch) -> list[ImageVectors]:
        """Vectors for every image of the batch."""

    @abstractmethod
    def query(self, batch: FeatureBatch, box: np.ndarray | None) -> QueryVector:
        """The query vector of a single-image batch; `box` in network pixels, None = the whole image."""

    def spaces(self) -> dict[str, SpaceSpec]:
        """How the index treats this recipe's vector spaces (kinds not listed: whitened and searchable)."""
        return {}

    def check(self) -> None:  # noqa: B027 - optional hook, nothing to check by default
        """Raise RecipeUnavailable when something this recipe needs is missing."""


def whole(inp: NetworkInput) -> np.ndarray:
    """The box (4,) covering a network input."""
    return np.array([0, 0, inp.pixels.shape[2], inp.pixels.shape[1]], dtype=np.float32)


def crop_map(feature: np.ndarray, box: np.ndarray | None, stride: int) -> np.ndarray:
    """The cells of a (C, h, w) map whose centres a box (network pixels) covers; None = the whole map."""
    if box is None:
        return feature
    x0, y0, x1, y1 = box_cells(box, stride, feature.shape[1], feature.shape[2])[0]
    return feature[:, y0:y1, x0:x1]


def with_whole_fallback(inp: NetworkInput, regions: Regions) -> Regions:
    """An image where a region source finds nothing gets one region covering it, so it can still be found."""
    if len(regions.boxes):
        return regions
    return Regions(whole(inp)[None], np.zeros(1, dtype=np.float32))
