"""One recipe for whole photos and small instances: DASR* region crops, the whole image and its photo vector per
image, matched against a query's crop, its own regions and, for a whole photo, its photo vector
(server/search.py region_set_search)."""

from __future__ import annotations

import numpy as np

from inserve.server.config import DasrConfig, ImageConfig, RegionRecipeConfig
from inserve.server.index import NewVectors, SpaceSpec
from inserve.server.recipes import sources
from inserve.server.recipes.base import FeatureBatch, ImageVectors, QueryVector
from inserve.server.recipes.crops import crop_batch, embed_images, expand_boxes, low_resolution_view
from inserve.server.recipes.dasr import DasrCropsRecipe
from inserve.server.stages.matching import sum_normalized
from inserve.server.stages.pooling import cells_max, l2_normalize
from inserve.server.stages.rmac import rmac_grid


class WholeAndRegionsRecipe(DasrCropsRecipe):
    """Stores per image what dasr_star_crops stores (its DASR* regions and the whole image, cropped and
    re-embedded: GeM, l2, no whitening) and one vector of the whole photo (`whole_photo`: R-MAC of its maps,
    PCA-whitened by the index). A query is its crop (its box, or the whole image) and that crop's own DASR*
    regions, and, without a box, its photo's vector too:
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

    def __init__(self, config: DasrConfig, regions: RegionRecipeConfig, image: ImageConfig) -> None:
        super().__init__(config, regions)
        self.region_set_weight, self.box_temperature = regions.region_set_weight, regions.box_temperature
        self.whole_weight = regions.whole_weight
        self.image = image

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
        crop = super().query(batch, box).raw
        inner = crop_batch(batch, box, self.image.long_side)  # the crop as an image of its own
        (own,) = self.embed(inner, [sources.dasr(inner, "dasr_star", self.config)[0].boxes.reshape(-1, 4)])
        if box is None:
            views = crop[None]
            whole = whole_photo(batch.maps["feat"][0])
        else:
            views = np.stack([crop, self.low_resolution(batch, box)]) if self.regions.query_low_side else crop[None]
            whole = None
        regions = np.concatenate([views, l2_normalize(own)])
        return QueryVector("region", crop, regions=regions, whole=whole, crop_views=len(views))

    def low_resolution(self, batch: FeatureBatch, box: np.ndarray) -> np.ndarray:
        """The query's crop embedded as seen at RegionRecipeConfig.query_low_side (crops.low_resolution_view)."""
        pixels, models, regions = batch.inputs[0].pixels, batch.models, self.regions
        (grown,) = expand_boxes(box, regions.crop_margin, pixels.shape[2], pixels.shape[1])
        view = low_resolution_view(pixels, grown, regions.query_low_side, regions.crop_long_side, models.size_multiple)
        return l2_normalize(embed_images(models, [view])[0])


# the whole photos' space is whitened to this many dims: holidays-dev 0.890 as at full dims (bench/fusion.py); it
# keeps no graph (its vectors score the region kNNs' candidates), so it costs an image its int8 raw, 1.3 KiB
WHOLE_DIMS = 256


def whole_photo(feat: np.ndarray) -> np.ndarray:
    """R-MAC of a photo's `feat` map (its regional MACs l2-normalised and summed, l2), whitened as a whole by the
    index: holidays-dev 0.878 alone, as with each region whitened first (bench/fusion.py), in one vector."""
    return sum_normalized(cells_max(feat, rmac_grid(feat.shape[1], feat.shape[2])))
