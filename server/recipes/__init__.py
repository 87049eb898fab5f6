"""Recipes: named combinations of stages that turn backbone maps into the vectors an index stores.

Every method of the five seed papers and the usual baselines, on the same index format:
mac, spoc, gem, rmac, crow (baselines); cam (seed 001); deepvision (seed 000); deep_region (seed 002);
clusters (seed 003); dasr, dasr_star, dasr_star_vlad (seed 004); dasr_star_crops (seed 004's DASR* regions
re-embedded as seed 002 does its detections); whole_and_regions (those crops, matched against a query's crop
and its own regions).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from inserve.server.config import ServerConfig
from inserve.server.errors import ConfigError, RecipeUnavailable
from inserve.server.index import SpaceSpec
from inserve.server.recipes.base import (
    FeatureBatch,
    ImageVectors,
    QueryVector,
    Recipe,
)
from inserve.server.stages.pooling import gem, mac, spoc
from inserve.server.stages.weighting import crow

__all__ = [
    "RECIPES",
    "FeatureBatch",
    "ImageVectors",
    "QueryVector",
    "Recipe",
    "RecipeUnavailable",
    "build_recipes",
    "check_recipe_names",
    "recipe_specs",
]


def _factories(config: ServerConfig) -> dict[str, Callable[[], Recipe]]:
    from inserve.server.detector import Detector
    from inserve.server.recipes.cam import CamRecipe
    from inserve.server.recipes.dasr import DasrCropsRecipe, DasrRecipe, DasrVladRecipe
    from inserve.server.recipes.detection import DeepRegionRecipe, DeepVisionRecipe
    from inserve.server.recipes.pooled import ClustersRecipe, GlobalPoolingRecipe, RmacRecipe
    from inserve.server.recipes.whole_and_regions import WholeAndRegionsRecipe

    detector = Detector(config.detector, config.engine)  # shared: one detector run serves both recipes
    return {
        "mac": lambda: GlobalPoolingRecipe("mac", mac),
        "spoc": lambda: GlobalPoolingRecipe("spoc", spoc),
        "gem": lambda: GlobalPoolingRecipe("gem", gem),
        "crow": lambda: GlobalPoolingRecipe("crow", crow),
        "rmac": RmacRecipe,
        "cam": lambda: CamRecipe(config.cam),
        "clusters": lambda: ClustersRecipe(config.clusters),
        "deepvision": lambda: DeepVisionRecipe(detector, config.detector, config.dasr),
        "deep_region": lambda: DeepRegionRecipe(detector, config.detector, config.regions, config.dasr, config.image),
        "dasr": lambda: DasrRecipe("dasr", "dasr", config.dasr),
        "dasr_star": lambda: DasrRecipe("dasr_star", "dasr_star", config.dasr),
        "dasr_star_vlad": lambda: DasrVladRecipe(config.dasr, config.regions, config.image),
        "dasr_star_crops": lambda: DasrCropsRecipe(config.dasr, config.regions),
        "whole_and_regions": lambda: WholeAndRegionsRecipe(config.dasr, config.regions),
    }


RECIPES: tuple[str, ...] = (
    "mac",
    "spoc",
    "gem",
    "rmac",
    "crow",
    "cam",
    "clusters",
    "deepvision",
    "deep_region",
    "dasr",
    "dasr_star",
    "dasr_star_vlad",
    "dasr_star_crops",
    "whole_and_regions",
)


def check_recipe_names(names: tuple[str, ...] | list[str]) -> None:
    """ConfigError naming the unknown recipes and every valid one."""
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        raise ConfigError(f"unknown recipe(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(RECIPES)}")


def build_recipes(names: tuple[str, ...] | list[str], config: ServerConfig) -> dict[str, Recipe]:
    check_recipe_names(names)
    factories = _factories(config)
    return {name: factories[name]() for name in names}


def recipe_specs(recipes: Mapping[str, Recipe]) -> dict[tuple[str, str], SpaceSpec]:
    """The index's per-space settings for a set of recipes."""
    return {(name, kind): spec for name, recipe in recipes.items() for kind, spec in recipe.spaces().items()}
