"""Every recipe indexes real photos and finds a planted instance, in-process through InstanceSearch.

The database: scikit-image sample photos at long side 256 (to keep DASR cheap on a CPU), one of which
(`coffee`) has scikit-image's `chelsea` (a cat) pasted into it at 40 % of its width (tests/photos.py). The query is the
whole `chelsea` photo, which is not in the database, as in composite-dev. Every recipe must rank the planted
image first; recipes that return boxes must put one on the pasted cat.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from photos import box_iou, encode, photo, planted
from PIL import Image

from inserve.server.codebook import learn_codebook, save_codebook, vectors_from_images
from inserve.server.config import QUERY_REGION_SOURCES, DetectorConfig, ImageConfig, RegionRecipeConfig, ServerConfig
from inserve.server.instance_search import InstanceSearch, UnavailableError
from inserve.server.recipes import RECIPES
from inserve.server.recipes.crops import embed_crops
from inserve.server.recipes.whole_and_regions import WholeAndRegionsRecipe, whole_photo
from inserve.server.search import SearchOptions
from inserve.server.stages.pooling import l2_normalize

DISTRACTORS = ("astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "camera", "coins")
CODEBOOK_PHOTOS = ("brick", "grass", "gravel")  # "other data" for dasr_star_vlad's codebook
PASTE = (0.45, 0.35, 0.40)  # left, top (fractions of the scene) and width (fraction) of the pasted cat
LONG_SIDE = 256


def jpeg(name: str) -> bytes:
    return encode(photo(name))


def planted_cat() -> tuple[bytes, tuple[int, int, int, int]]:
    scene, cat = photo("coffee"), photo("chelsea")
    composite, box = planted(scene, cat, PASTE[2] * scene.shape[1] / cat.shape[1], PASTE[:2])
    return encode(composite), box


@pytest.fixture(scope="module")
def models(models_dir: Path) -> Path:
    return models_dir


def config(models: Path, data_dir: Path, recipes: tuple[str, ...], **changes: object) -> ServerConfig:
    base = ServerConfig(
        data_dir=data_dir,
        models=models,
        recipes=recipes,
        image=ImageConfig(long_side=LONG_SIDE),
        regions=RegionRecipeConfig(deep_region_source="dasr_star"),
    )
    return replace(base, **changes)


@pytest.fixture(scope="module")
def service(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InstanceSearch, tuple]]:
    """Every recipe in one index (they share the backbone run and the DASR* regions); dasr_star_vlad's
    codebook learned from other photos."""
    core = InstanceSearch(config(models, tmp_path_factory.mktemp("data"), RECIPES))
    scene, box = planted_cat()
    core.index_image("planted", scene)
    for name in DISTRACTORS:
        core.index_image(name, jpeg(name))
    folder = tmp_path_factory.mktemp("other")
    for name in CODEBOOK_PHOTOS:
        (folder / f"{name}.jpg").write_bytes(jpeg(name))

    def regions(images: list[bytes]) -> list[np.ndarray]:
        described = core.describe([core.load(data) for data in images])
        return [v.raw for d in described for v in d["dasr_star_vlad"].vectors if v.kind == "region"]

    vectors = vectors_from_images(regions, sorted(folder.glob("*.jpg")))
    save_codebook(core.index, learn_codebook(vectors, 4), str(folder))
    core.relearn_whitening()
    yield core, box
    core.close()


REGION_RECIPES = {"dasr", "dasr_star", "dasr_star_crops", "whole_and_regions"}  # boxes without re-ranking
FUSED = {"whole_and_regions"}  # every image scored by its whole and its regions: no re-ranking, no QE
# VLAD describes whole images (seed 004 uses it for image-level search): a cat covering 16 % of a coffee
# table scene does not make that scene's VLAD the closest to a cat photo's among 7, so this image-level
# recipe finds the instance through its region re-ranking, as an instance query on it should
IMAGE_LEVEL = {"dasr_star_vlad": SearchOptions(query_expansion=0, rerank_top=5)}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_finds_the_planted_instance(service: tuple[InstanceSearch, tuple], recipe: str) -> None:
    core, truth = service
    query = jpeg("chelsea")
    options = IMAGE_LEVEL.get(recipe, SearchOptions(query_expansion=0, rerank_top=0))
    hits = core.search(query, None, 5, recipe, options)
    assert hits[0].image.external_id == "planted", [(h.image.external_id, h.score) for h in hits]
    if recipe in REGION_RECIPES:
        assert box_iou(hits[0].box, truth) >= 0.3, (hits[0].box, truth)
        assert hits[0].region_source == core.recipes[recipe].region_source


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r not in ("mac", "spoc", "gem", "crow", *FUSED)])
def test_reranking_localises_the_planted_instance(service: tuple[InstanceSearch, tuple], recipe: str) -> None:
    core, truth = service
    hits = core.search(jpeg("chelsea"), None, 5, recipe, SearchOptions(query_expansion=1, rerank_top=5))
    assert hits[0].image.external_id == "planted"
    assert hits[0].box is not None and hits[0].region_source == core.recipes[recipe].region_source
    assert box_iou(hits[0].box, truth) > 0.1, (recipe, hits[0].box, truth)


def test_global_recipes_refuse_reranking(service: tuple[InstanceSearch, tuple]) -> None:
    core, _ = service
    with pytest.raises(ValueError, match="stores no regions"):
        core.search(jpeg("chelsea"), None, 5, "gem", SearchOptions(rerank_top=5))


@pytest.mark.parametrize("options", [SearchOptions(rerank_top=5), SearchOptions(query_expansion=2)])
def test_fused_recipes_refuse_reranking_and_expansion(service: tuple[InstanceSearch, tuple], options) -> None:
    core, _ = service
    with pytest.raises(ValueError, match=r"whole_and_regions .* takes no query_expansion or rerank_top"):
        core.search(jpeg("chelsea"), None, 5, "whole_and_regions", options)


def test_deepvision_defaults_to_rerank_and_qe_over_dasr_star(service: tuple[InstanceSearch, tuple]) -> None:
    core, _ = service
    hits = core.search(jpeg("chelsea"), None, 5, "deepvision")  # N = 100, M = 5 by default
    assert hits[0].image.external_id == "planted" and hits[0].region_source == "dasr_star"
    assert all(h.box is not None for h in hits)


def test_cam_online_mode_finds_it_too(service: tuple[InstanceSearch, tuple], tmp_path: Path) -> None:
    core, _ = service
    # a copy of the data directory (one process at a time may hold one), read by a service that aggregates the
    # stored class vectors over the query's top classes at search time
    core.index.snapshot()
    shutil.copytree(core.config.data_dir, tmp_path / "copy")
    online_config = replace(core.config, data_dir=tmp_path / "copy", cam=replace(core.config.cam, mode="online"))
    online = InstanceSearch(online_config, core.models)
    try:
        hits = online.search(jpeg("chelsea"), None, 5, "cam", SearchOptions(0, 0))
        assert hits[0].image.external_id == "planted"
    finally:
        online.close()


def test_missing_detector_disables_only_the_detector_recipes(models: Path, tmp_path: Path) -> None:
    missing = tmp_path / "fasterrcnn_resnet50_fpn" / "detector.onnx"
    core = InstanceSearch(
        config(
            models,
            tmp_path / "data",
            ("gem", "deep_region", "deepvision"),
            detector=DetectorConfig(path=missing),
            regions=RegionRecipeConfig(deep_region_source="detector"),
        )
    )
    try:
        assert set(core.unavailable) == {"deep_region", "deepvision"}
        core.index_image("coffee", jpeg("coffee"))
        assert core.search(jpeg("coffee"), None, 1, "gem")[0].image.external_id == "coffee"
        for recipe in ("deep_region", "deepvision"):
            with pytest.raises(UnavailableError, match=str(missing)):
                core.search(jpeg("coffee"), None, 1, recipe)
    finally:
        core.close()


def test_vlad_without_codebook_says_how_to_learn_one(models: Path, tmp_path: Path) -> None:
    core = InstanceSearch(config(models, tmp_path / "data", ("dasr_star_vlad",)))
    try:
        core.index_image("coffee", jpeg("coffee"))
        with pytest.raises(UnavailableError, match="learn-codebook"):
            core.search(jpeg("coffee"), None, 1, "dasr_star_vlad")
    finally:
        core.close()


def test_vlad_finds_a_scene_at_image_level(service: tuple[InstanceSearch, tuple]) -> None:
    core, _ = service
    scene = Image.fromarray(photo("rocket"))
    scene = scene.resize((scene.width * 3 // 4, scene.height * 3 // 4), Image.BICUBIC)  # another size, re-encoded
    hits = core.search(encode(scene), None, 3, "dasr_star_vlad", SearchOptions(query_expansion=0, rerank_top=0))
    assert hits[0].image.external_id == "rocket"


def test_whole_and_regions_finds_a_photo_by_its_whole_and_an_instance_by_its_box(
    service: tuple[InstanceSearch, tuple],
) -> None:
    """Without a box the query is a photo (its whole counts): the rescaled rocket finds its own photo; with a
    box (here the whole cat photo) it is an instance, scored by its crop's views as before."""
    core, truth = service

    def query(data: bytes, box: tuple | None):
        return core.pipeline.queries(core.load(data), box, ["whole_and_regions"])["whole_and_regions"]

    scene = Image.fromarray(photo("rocket"))
    scene = scene.resize((scene.width * 3 // 4, scene.height * 3 // 4), Image.BICUBIC)
    assert query(encode(scene), None).whole is not None
    assert core.search(encode(scene), None, 3, "whole_and_regions")[0].image.external_id == "rocket"
    cat = photo("chelsea")
    box = (0.0, 0.0, float(cat.shape[1]), float(cat.shape[0]))
    boxed = query(jpeg("chelsea"), box)
    assert boxed.whole is None and boxed.crop_views == 2  # the crop as given and at query_low_side
    assert len(boxed.regions) > 2 and float(boxed.regions[0] @ boxed.regions[1]) < 0.99
    hits = core.search(jpeg("chelsea"), box, 3, "whole_and_regions")
    assert hits[0].image.external_id == "planted" and box_iou(hits[0].box, truth) >= 0.3


@pytest.mark.parametrize("source", QUERY_REGION_SOURCES)
def test_a_querys_crop_is_embedded_as_the_index_embeds_its_crops(
    service: tuple[InstanceSearch, tuple], source: str
) -> None:
    """The query's crop vector comes from the run that also finds its own regions (the moments graph for
    DASR*, the backbone for the grid): it must be what embed_crops gives the same box on the index side; its
    own regions lie inside its box."""
    core, _ = service
    recipe = WholeAndRegionsRecipe(core.config.dasr, replace(core.config.regions, query_regions=source))
    inp = core.load(jpeg("chelsea"))
    box = np.array([40, 30, 300, 250], np.float32)  # network pixels
    regions = core.config.regions
    (expected,) = embed_crops(core.models, [inp.pixels], [box[None]], regions.crop_long_side, regions.crop_margin)
    query = recipe.query(core.pipeline.features([inp]), box)
    np.testing.assert_allclose(query.regions[0], l2_normalize(expected[0]), atol=1e-4)
    assert query.crop_views == 2 and len(query.regions) > 3


def test_whole_photo_of_a_flat_map_is_its_channels() -> None:
    """Every R-MAC region of a map constant per channel has that channel's value: the photo vector is them, l2."""
    channels = np.array([3.0, 4.0, 0.0], np.float32)
    feat = np.broadcast_to(channels[:, None, None], (3, 6, 8)).copy()
    np.testing.assert_allclose(whole_photo(feat), channels / 5.0, rtol=1e-6)
