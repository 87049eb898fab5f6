"""One recipe for whole photos and small instances: DASR* region crops and the whole image per image, matched
against a query's crop and its own regions (server/search.py region_set_search)."""

from __future__ import annotations

import numpy as np

from inserve.server.config import DasrConfig, ImageConfig, RegionRecipeConfig
from inserve.server.index import SpaceSpec
from inserve.server.recipes import sources
from inserve.server.recipes.base import FeatureBatch, QueryVector
from inserve.server.recipes.crops import crop_batch
from inserve.server.recipes.dasr import DasrCropsRecipe
from inserve.server.stages.pooling import l2_normalize


class WholeAndRegionsRecipe(DasrCropsRecipe):
    """Stores what dasr_star_crops stores: per image its DASR* regions and the whole image, cropped and
    re-embedded (GeM, l2; no whitening). A query is its crop (its box, or the whole image) and that crop's own
    DASR* regions; an image scores `region_set_weight` x the mean of the query regions' best matches among the
    image's regions + the rest x the crop's best match. The hit's box is the mean of the image's region boxes
    weighted by softmax(similarity to the crop / `box_temperature`): composite-dev localisation 0.755, the best
    region's box alone 0.515 (it is the right size but off-centre; the near-best regions are off the other ways).

    Why (bench/fusion.py, dev sets, mAP holidays / composite / ukbench): the crop's best match finds small
    instances (0.796 / 0.838 / 0.987) but ranks whole photos below GeM (0.824 / 0.248 / 0.995; whitened 0.866 /
    0.334 / 0.995); the mean of the query regions' best matches compares photos part by part (0.862 / 0.666 /
    0.995). At weight 0.4 their sum keeps the crop's composite figure and gains on whole photos: 0.855 / 0.838
    / 0.996. A whitened GeM term lowered every fusion on composite and raised none on holidays, so the whole
    image is described by its crop among the regions, not by a global space of its own; no space is whitened
    (whitening lowered the crops' mAP, see DasrCropsRecipe).

    The region space is compact (SpaceSpec.compact): its graph holds a PCA reduction learned on its own vectors
    and SQLite keeps them in int8, 102 -> ~29 KiB per image (bench/README.md, "Compact storage").
    """

    name = "whole_and_regions"

    def __init__(self, config: DasrConfig, regions: RegionRecipeConfig, image: ImageConfig) -> None:
        super().__init__(config, regions)
        self.region_set_weight, self.box_temperature = regions.region_set_weight, regions.box_temperature
        self.image = image

    def spaces(self) -> dict[str, SpaceSpec]:
        return {"region": SpaceSpec(whiten=False, compact=True)}

    def query(self, batch: FeatureBatch, box: np.ndarray | None) -> QueryVector:
        crop = super().query(batch, box).raw
        inner = crop_batch(batch, box, self.image.long_side)  # the crop as an image of its own
        (own,) = self.embed(inner, [sources.dasr(inner, "dasr_star", self.config)[0].boxes.reshape(-1, 4)])
        return QueryVector("region", crop, regions=np.concatenate([crop[None], l2_normalize(own)]))
