"""One recipe for whole photos and small instances: DASR* region crops, the whole image and its photo vector per
image, matched against a query's crop, its own regions and, for a whole photo, its photo vector
(server/search.py region_set_search)."""

from __future__ import annotations

import numpy as np

from inserve.server.config import DasrConfig, RegionRecipeConfig
from inserve.server.index import NewVectors, SpaceSpec
from inserve.server.models import ModelBundle
from inserve.server.recipes import sources
from inserve.server.recipes.base import FeatureBatch, ImageVectors, QueryVector, whole
from inserve.server.recipes.crops import (
    boxes_from_crop,
    crop_image,
    crops_of,
    embed_images,
    expand_boxes,
    low_resolution_view,
)
from inserve.server.recipes.dasr import DasrCropsRecipe
from inserve.server.stages.matching import sum_normalized
from inserve.server.stages.pooling import cells_max, gem, l2_normalize
from inserve.server.stages.rmac import rmac_grid


class WholeAndRegionsRecipe(DasrCropsRecipe):
    """Stores per image what dasr_star_crops stores (its DASR* regions and the whole image, cropped and
    re-embedded: GeM, l2, no whitening) and one vector of the whole photo (`whole_photo`: R-MAC of its maps,
    PCA-whitened by the index). A query is its crop (its box, or the whole image) and that crop's own regions
    (`query_regions`: the R-MAC grid of the crop, or its DASR* regions; the grid scores as well at a fraction of
    the cost, bench/README.md "Search latency"), and, without a box, its photo's vector too:
    - with a box (an instance, however small; the whole image's box when the photo shows just the object), an
      image scores `region_set_weight` x the mean of the query regions' best matches among the image's regions
      + the rest x the crop's best match (stages/matching.py region_set_score), the crop matched as given and
      as seen at `query_low_side` (crops.low_resolution_view: how a small instance looks among the index's
      upscaled crops), each region's better view counting (composite-dev 0.828 -> 0.867);
    - without one (a whole photo), `whole_weight` x the photos' whitened similarity + the rest x that mean of
      the query regions' best matches (whole_photo_score): the crop's single best match is left out, as it
      ranks any scene holding one of the photo's objects.
    The hit's box is the mean of the image's region boxes weighted by softmax(similarity to the crop /
    `box_temperature`): composite-dev localisation 0.784, the best region's box alone 0.515 (it is the right
    size but off-centre; the near-best regions are off the other ways).

    Why (bench/fusion.py, dev sets, mAP holidays / composite / ukbench): the crop's best match finds small
    instances (0.796 / 0.838 / 0.987) but ranks whole photos below GeM (0.824 / 0.248 / 0.995); the mean of the
    query regions' best matches compares photos part by part (0.862 / 0.666 / 0.995). At weight 0.4 their sum
    keeps the crop's composite figure and gains on whole photos: 0.855 / 0.838 / 0.996. Any whole-image term
    lowered composite-dev (small objects in clutter: the scene decides it), so a query with a box has none; a
    whole photo's query gains from it: the whitened R-MAC alone gives holidays 0.878, and 0.4 of it with 0.6 of
    the regions' mean 0.890 (ukbench 0.996).

    Whitening where it helps: the photos' space is whitened (to WHOLE_DIMS), the regions' is not (whitening
    lowered the crops' mAP, see DasrCropsRecipe). Both spaces are compact (SpaceSpec.compact): int8 raw vectors
    in SQLite, their transform learned by the service on their own vectors at IndexConfig.compact_after and as
    they double, and by `inserve whiten`; the regions' graph holds a PCA reduction, the photos' space no graph
    (it scores the region kNNs' candidates). 30.5 KiB per image instead of 102 (bench/README.md, "Compact
    storage").
    """

    name = "whole_and_regions"

    def __init__(self, config: DasrConfig, regions: RegionRecipeConfig) -> None:
        super().__init__(config, regions)
        self.region_set_weight, self.box_temperature = regions.region_set_weight, regions.box_temperature
        self.whole_weight = regions.whole_weight

    def spaces(self) -> dict[str, SpaceSpec]:
        return {
            "region": SpaceSpec(whiten=False, compact=True),
            "global": SpaceSpec(searchable=False, compact=True, whiten_dims=WHOLE_DIMS),
        }

    def describe(self, batch: FeatureBatch) -> list[ImageVectors]:
        return [
            ImageVectors([*image.vectors, NewVectors(self.name, "global", whole_photo(feat)[None])], image.regions)
            for feat, image in zip(batch.maps["feat"], super().describe(batch))
        ]

    def query(self, batch: FeatureBatch, box: np.ndarray | None) -> QueryVector:
        """The crop (its box, or the whole image) is cut as the index's crops are (at crop_long_side); one
        network run on it gives both its vector (GeM of its feat, what embed_crops gives) and its own regions.
        Those are cut from the query's own pixels, finer than the crop's, and embedded in one call with the
        crop's low-resolution view: two network calls beside the batch's backbone run."""
        inp, models, regions = batch.inputs[0], batch.models, self.regions
        pixels = inp.pixels
        height, width = pixels.shape[1:]
        (grown,) = expand_boxes(whole(inp) if box is None else box, regions.crop_margin, width, height)
        crop = crop_image(pixels, grown, regions.crop_long_side, models.size_multiple)
        vector, found = self.crop_and_regions(models, crop)
        own = crops_of(
            pixels,
            boxes_from_crop(found, grown, crop, width, height),
            regions.crop_long_side,
            models.size_multiple,
            regions.crop_margin,
        )
        low = [self.low_resolution(pixels, grown, models)] if box is not None and regions.query_low_side else []
        embedded = l2_normalize(embed_images(models, own + low)) if own or low else np.zeros((0, len(vector)))
        views = np.concatenate([vector[None], embedded[len(own) :]])
        whole_vector = whole_photo(batch.maps["feat"][0]) if box is None else None
        return QueryVector(
            "region",
            vector,
            regions=np.concatenate([views, embedded[: len(own)]]),
            whole=whole_vector,
            crop_views=len(views),
        )

    def crop_and_regions(self, models: ModelBundle, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The crop's vector and its own regions (boxes in its pixels) from one network run: the moments graph
        for DASR*, the backbone for the R-MAC grid (its levels below the whole crop, which is a view already;
        with the whole among them whole photos ranked worse, bench/README.md "Search latency")."""
        if self.regions.query_regions == "dasr_star":
            inner = FeatureBatch.run(models, crop[None], sources.stop_stride(models, self.config))
            boxes = sources.dasr(inner, "dasr_star", self.config)[0].boxes.reshape(-1, 4)
        else:
            inner = FeatureBatch.run(models, crop[None])
            feat = inner.maps["feat"][0]
            boxes = sources.rmac(feat.shape[1], feat.shape[2], inner.stride("feat"), QUERY_GRID_LEVELS)[1][1:]
        return l2_normalize(gem(inner.maps["feat"][0])), boxes

    def low_resolution(self, pixels: np.ndarray, grown: np.ndarray, models: ModelBundle) -> np.ndarray:
        """The query's crop as seen at RegionRecipeConfig.query_low_side (crops.low_resolution_view), to embed."""
        regions = self.regions
        return low_resolution_view(pixels, grown, regions.query_low_side, regions.crop_long_side, models.size_multiple)


QUERY_GRID_LEVELS = 2  # the R-MAC grid's levels a query's own regions take (query_regions "rmac_grid")

# the whole photos' space is whitened to this many dims: holidays-dev 0.890 as at full dims (bench/fusion.py); it
# keeps no graph (its vectors score the region kNNs' candidates), so it costs an image its int8 raw, 1.3 KiB
WHOLE_DIMS = 256


def whole_photo(feat: np.ndarray) -> np.ndarray:
    """R-MAC of a photo's `feat` map (its regional MACs l2-normalised and summed, l2), whitened as a whole by the
    index: holidays-dev 0.878 alone, as with each region whitened first (bench/fusion.py), in one vector."""
    return sum_normalized(cells_max(feat, rmac_grid(feat.shape[1], feat.shape[2])))
