"""Region-set search (whole_and_regions) over hand-made vectors: every candidate scores w x the mean of the
query regions' best matches + (1 - w) x the crop's best match, or, for a whole-photo query, v x its photo's
similarity + (1 - v) x that mean, computed here by hand; the box is the region that best matches the crop."""

from pathlib import Path

import numpy as np
import pytest

from inserve.server.config import IndexConfig
from inserve.server.index import InstanceIndex, NewVectors, SpaceSpec
from inserve.server.recipes import QueryVector
from inserve.server.search import region_set_search
from inserve.server.stages.matching import region_set_score, soft_box, whole_photo_score
from inserve.server.stages.pooling import l2_normalize

# the scoring maths by hand: vectors kept in memory at full precision (float16 is the storage test's)
EXACT = IndexConfig(auto_whiten_per_dim=0, scoring_precision="float32")

SPECS = {("s", "region"): SpaceSpec(whiten=False), ("s", "global"): SpaceSpec(whiten=False, searchable=False)}
BOXES = np.array([[0, 0, 4, 4], [5, 5, 9, 9], [0, 0, 10, 10]], dtype=np.float32)
# three regions per image, at BOXES: two parts and the whole image
IMAGES = {
    "instance": [[0, 0, 0, 1], [0, 1, 0, 0], [0.2, 0.5, 0, 0.5]],  # the query's object at BOXES[0], small
    "same scene": [[1, 0, 0, 0.3], [0, 0, 1, 0], [0.7, 0, 0.7, 0.3]],  # the query's parts, not the object itself
    "neither": [[0, 1, 0, 0], [0, 1, 0.1, 0], [0, 1, 0.05, 0]],
}
# the query: its crop first (the object), then its own regions (parts of its photo)
QUERY_REGIONS = l2_normalize(np.array([[0, 0, 0.2, 1], [1, 0, 0, 0], [0, 0, 1, 0]], np.float32))
QUERY = QueryVector("region", QUERY_REGIONS[0], rerank=QUERY_REGIONS[0], regions=QUERY_REGIONS)
# each image's whole photo: `neither`'s is the query photo's own, the others' are unlike it
PHOTOS = {"instance": [0, 1, 0], "same scene": [0, 0.6, 0.8], "neither": [1, 0, 0]}
WHOLE_QUERY = QueryVector("region", QUERY_REGIONS[0], regions=QUERY_REGIONS, whole=np.array([1, 0, 0], np.float32))


@pytest.fixture
def index(tmp_path: Path):
    index = InstanceIndex(tmp_path, EXACT, SPECS)
    for name, regions in IMAGES.items():
        vectors = NewVectors("s", "region", np.array(regions, np.float32), BOXES, np.array([0.5, 0.25, 0], np.float32))
        photo = NewVectors("s", "global", np.array([PHOTOS[name]], np.float32))
        index.add_image(name, [vectors, photo], width=10, height=10)
    yield index
    index.close()


def by_hand(weight: float) -> dict[str, tuple[float, int]]:
    """Each image's score and the region that best matches the crop, from the definition."""
    expected = {}
    for name, regions in IMAGES.items():
        sims = QUERY_REGIONS @ l2_normalize(np.array(regions, np.float32)).T  # (query vectors, regions)
        crop, own = sims[0].max(), sims[1:].max(axis=1).mean()
        expected[name] = (weight * float(own) + (1 - weight) * float(crop), int(sims[0].argmax()))
    return expected


@pytest.mark.parametrize("weight", [0.0, 0.4, 1.0])
def test_scores_boxes_and_order_are_the_definition(index: InstanceIndex, weight: float) -> None:
    hits = region_set_search(index, "s", QUERY, 3, weight, depth=3, region_source="dasr_star")
    expected = by_hand(weight)
    assert [h.image.external_id for h in hits] == sorted(expected, key=lambda n: -expected[n][0])
    for hit in hits:
        score, best = expected[hit.image.external_id]
        assert hit.score == pytest.approx(score, abs=1e-5)
        np.testing.assert_array_equal(hit.box, BOXES[best])
        assert hit.region_source == "dasr_star"


def test_the_weight_moves_the_instance_and_the_scene(index: InstanceIndex) -> None:
    """The crop's best match alone: the image holding the object first; the query regions' alone: the scene."""
    assert region_set_search(index, "s", QUERY, 1, 0.0, depth=3)[0].image.external_id == "instance"
    assert region_set_search(index, "s", QUERY, 1, 1.0, depth=3)[0].image.external_id == "same scene"


def test_a_candidate_found_by_one_query_vector_is_scored_on_all(index: InstanceIndex) -> None:
    """depth 1: the crop's kNN finds `instance`, the query regions' kNNs `same scene`; each is scored on every
    query vector, and `neither` (no kNN's first) is not returned."""
    hits = region_set_search(index, "s", QUERY, 3, 0.4, depth=1)
    expected = by_hand(0.4)
    assert {h.image.external_id for h in hits} == {"instance", "same scene"}
    for hit in hits:
        assert hit.score == pytest.approx(expected[hit.image.external_id][0], abs=1e-5)


def test_a_query_without_regions_of_its_own_scores_by_its_crop() -> None:
    sims = np.array([[0.2, 0.9, 0.5]])
    assert region_set_score(sims, 0.4) == (pytest.approx(0.9), 1)


def test_the_box_averages_the_regions_by_their_match_to_the_crop(index: InstanceIndex) -> None:
    """Temperature t: each hit's box is sum softmax(crop similarity / t) x box over the image's regions."""
    t = 0.1
    for hit in region_set_search(index, "s", QUERY, 3, 0.4, depth=3, box_temperature=t):
        sims = l2_normalize(np.array(IMAGES[hit.image.external_id], np.float32)) @ QUERY_REGIONS[0]
        weights = np.exp((sims - sims.max()) / t) / np.exp((sims - sims.max()) / t).sum()
        np.testing.assert_allclose(hit.box, weights @ BOXES, rtol=1e-5, atol=1e-4)


def test_soft_box_by_hand() -> None:
    boxes = np.array([[0, 0, 10, 10], [10, 10, 20, 20]], dtype=np.float64)
    # equal similarities: the middle; temperature 0: the best region's box
    np.testing.assert_allclose(soft_box(boxes, np.array([0.5, 0.5]), 0.05), [5, 5, 15, 15])
    np.testing.assert_array_equal(soft_box(boxes, np.array([0.4, 0.5]), 0.0), [10, 10, 20, 20])
    # a gap of t ln 3 weighs the boxes 3 : 1
    np.testing.assert_allclose(soft_box(boxes, np.array([0.5 + 0.05 * np.log(3), 0.5]), 0.05), [2.5, 2.5, 12.5, 12.5])


@pytest.mark.parametrize("whole_weight", [0.0, 0.4, 1.0])
def test_a_whole_photo_query_scores_its_photo_and_its_regions(index: InstanceIndex, whole_weight: float) -> None:
    """v x the photos' cosine + (1 - v) x the mean of the query regions' best matches; the crop's best match
    (the instance term) counts for nothing, and the set weight is not used."""
    hits = region_set_search(index, "s", WHOLE_QUERY, 3, 0.4, depth=3, whole_weight=whole_weight)
    expected = {}
    for name, regions in IMAGES.items():
        sims = QUERY_REGIONS @ l2_normalize(np.array(regions, np.float32)).T
        photo = float(l2_normalize(np.array(PHOTOS[name], np.float32)) @ WHOLE_QUERY.whole)
        expected[name] = whole_weight * photo + (1 - whole_weight) * float(sims[1:].max(axis=1).mean())
    assert [h.image.external_id for h in hits] == sorted(expected, key=lambda n: -expected[n])
    for hit in hits:
        assert hit.score == pytest.approx(expected[hit.image.external_id], abs=1e-5)


def test_the_photos_score_only_the_region_knns_candidates(index: InstanceIndex) -> None:
    """depth 1: the region kNNs find `instance` and `same scene`; `neither`, whose photo is the query's own, is
    not searched for by its photo and is not returned."""
    hits = region_set_search(index, "s", WHOLE_QUERY, 3, 0.4, depth=1, whole_weight=1.0)
    assert {h.image.external_id for h in hits} == {"instance", "same scene"}


def test_images_without_a_photo_vector_score_as_for_a_box(tmp_path: Path) -> None:
    """An image indexed before the recipe stored photos scores by the box rule; the others by the photo rule."""
    index = InstanceIndex(tmp_path, EXACT, SPECS)
    try:
        for name, regions in IMAGES.items():
            vectors = [NewVectors("s", "region", np.array(regions, np.float32), BOXES)]
            if name != "instance":
                vectors.append(NewVectors("s", "global", np.array([PHOTOS[name]], np.float32)))
            index.add_image(name, vectors, width=10, height=10)
        hits = {
            h.image.external_id: h.score
            for h in region_set_search(index, "s", WHOLE_QUERY, 3, 0.4, 3, whole_weight=0.5)
        }
    finally:
        index.close()
    assert hits["instance"] == pytest.approx(by_hand(0.4)["instance"][0], abs=1e-5)
    sims = QUERY_REGIONS @ l2_normalize(np.array(IMAGES["neither"], np.float32)).T
    assert hits["neither"] == pytest.approx(0.5 * 1.0 + 0.5 * float(sims[1:].max(axis=1).mean()), abs=1e-5)


def test_whole_photo_score_by_hand() -> None:
    sims = np.array([[0.9, 0.1], [0.2, 0.6], [0.4, 0.0]])  # crop, then two own regions
    assert whole_photo_score(0.5, sims, 0.4) == pytest.approx(0.4 * 0.5 + 0.6 * (0.6 + 0.4) / 2)
    assert whole_photo_score(0.5, sims[:1], 0.4) == pytest.approx(0.4 * 0.5 + 0.6 * 0.9)  # no regions: the crop


def test_the_crops_best_view_counts(index: InstanceIndex) -> None:
    """Two views of the crop (as given, and as a small instance looks): each region's crop similarity is the
    better of the two, in the score and in the box; its own regions follow the views."""
    view = l2_normalize(np.array([1, 0, 0, 0.3], np.float32))  # like `same scene`'s first region
    regions = np.concatenate([QUERY_REGIONS[:1], view[None], QUERY_REGIONS[1:]])
    query = QueryVector("region", QUERY_REGIONS[0], regions=regions, crop_views=2)
    hits = region_set_search(index, "s", query, 3, 0.4, depth=3)
    for hit in hits:
        stored = l2_normalize(np.array(IMAGES[hit.image.external_id], np.float32))
        crop = np.maximum(stored @ QUERY_REGIONS[0], stored @ view)
        own = (QUERY_REGIONS[1:] @ stored.T).max(axis=1).mean()
        assert hit.score == pytest.approx(0.4 * own + 0.6 * crop.max(), abs=1e-5)
        np.testing.assert_array_equal(hit.box, BOXES[int(crop.argmax())])
    assert hits[0].image.external_id == "same scene"  # its region matches the second view exactly
